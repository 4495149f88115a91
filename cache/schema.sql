-- The neuron database: one DuckDB file per model, data/<model-slug>.duckdb.
-- Written once by `python -m precompute build` (cache/writer.py); the dashboard opens it read-only.
-- Polarity is +1 (the neuron's positive side: top activations) or -1 (its negative side: bottom activations).
-- A neuron is (layer, neuron): the `neuron`-th input of model.model.layers[layer].mlp.down_proj.
--
-- Physical layout (cache/writer.py, cache/key_map.py): every batch is inserted ORDER BY its table's key
-- (cache/schema.py SORT_KEYS), so DuckDB's per-row-group min/max lets a lookup of one neuron skip the rest.
-- Readers open the file read-only and fetch search results by DuckDB rowid (stable: written once);
-- no index is added beyond the primary keys below. Builds may store extra meta keys (e.g. build_config).

-- Key/value facts about the build. Required keys:
--   schema_version, model_id, model_slug, n_layers, n_neurons, seq_len, n_sequences, n_tokens,
--   corpus_sources (JSON list of {name, licence, n_sequences}), corpus_hash,
--   explainer, scorer, embedding_model, embedding_dim, versions (JSON), build_time (ISO 8601, UTC)
-- An imported database (cache/importers/) has no corpus of its own; instead of the corpus keys it
-- carries (cache/schema.py IMPORTED_META):
--   source         JSON {name, format, location, tables, version, licence, url}: where the rows came from
--                  (a DSN is stored without its password)
--   lacks          JSON list of what the source does not publish, e.g. ["per_token_activations"]
--                  (cache/provenance.py says each in words)
--   engine_model   the --model the engine loads for live traces and steering; '' = none can
--                  (e.g. GPT-2 XL is not a Llama): the database is for browsing only, and
--   live_note      says why, in one sentence
--   import_command the command that (re)imports it
-- Optional: scorers (JSON list of {name, version, description}), the scorers of the scores table.
-- A build also stores described_layers (JSON list) and partial ('true' for the quick partial database
-- that `make demo` writes before the full one, precompute/quick.py; 'false' otherwise): a partial
-- database covers n_sequences sequences and describes only described_layers.
CREATE TABLE IF NOT EXISTS meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

-- One row per neuron. promotes/suppresses: the tokens its output weights push up/down through the
-- unembedding (W_U @ down_proj.weight[:, neuron]), most extreme first, for its positive polarity.
CREATE TABLE IF NOT EXISTS neurons (
    layer      INTEGER NOT NULL,
    neuron     INTEGER NOT NULL,
    promotes   VARCHAR[],
    suppresses VARCHAR[],
    PRIMARY KEY (layer, neuron)
);

-- The corpus, cut into fixed-length token sequences.
CREATE TABLE IF NOT EXISTS sequences (
    seq_id  INTEGER PRIMARY KEY,
    source  VARCHAR NOT NULL,      -- corpus source name, e.g. 'bible', 'pydoc', 'changelogs'
    text    VARCHAR NOT NULL,      -- the decoded text of the sequence
    tokens  VARCHAR[] NOT NULL     -- one string per token, decoded; [] when an import has only the text
);

-- One description per (neuron, polarity).
CREATE TABLE IF NOT EXISTS descriptions (
    layer     INTEGER NOT NULL,
    neuron    INTEGER NOT NULL,
    polarity  TINYINT NOT NULL,    -- +1 or -1
    text      VARCHAR NOT NULL,    -- the full description
    summary   VARCHAR NOT NULL,    -- under 15 words
    score     DOUBLE,              -- the main score (simulation correlation on held-out sequences), NULL if not scored
    explainer VARCHAR NOT NULL,    -- which explainer wrote it, e.g. 'offline-v1' or 'llm:<model>'
    score_scorer VARCHAR,          -- which scores.scorer `score` is; NULL when score is NULL
    PRIMARY KEY (layer, neuron, polarity)
);

-- Every score of every (neuron, polarity) description, one row per scorer.
CREATE TABLE IF NOT EXISTS scores (
    layer    INTEGER NOT NULL,
    neuron   INTEGER NOT NULL,
    polarity TINYINT NOT NULL,
    scorer   VARCHAR NOT NULL,   -- e.g. 'offline-token-match-v2', 'embedding-auc-v1', 'transluce-simulation'
    version  VARCHAR NOT NULL,   -- the scorer's version string
    value    DOUBLE,             -- NULL = the scorer made no prediction (never stored as 0)
    split    VARCHAR NOT NULL,   -- what it was measured on: 'test' (held out), 'train', or 'source' (imported as published)
    n        INTEGER,            -- sequences (or tokens) it pooled; NULL if unknown
    detail   VARCHAR,            -- optional JSON: provenance, e.g. {"source": "transluce", "table": ..., "field": ...}
    PRIMARY KEY (layer, neuron, polarity, scorer)
);

-- The embedding of each description (L2-normalised), dimension in meta.embedding_dim.
-- The array type is created with the real dimension by cache/writer.py (FLOAT[d]).
CREATE TABLE IF NOT EXISTS embeddings (
    layer    INTEGER NOT NULL,
    neuron   INTEGER NOT NULL,
    polarity TINYINT NOT NULL,
    vec      FLOAT[384] NOT NULL,
    PRIMARY KEY (layer, neuron, polarity)
);

-- Exemplars: top-K sequences per (neuron, polarity) and a shared random sample.
-- split is 'train' or 'test' for top exemplars (rank 0 = most extreme), 'random' for random ones,
-- and 'source' for an imported top exemplar (as published; the publisher's own split is not known).
-- polarity is +1 / -1 for top / bottom exemplars and 0 for random ones (shared by both polarities).
-- max_act is the sequence's max activation (min for polarity -1), acts the per-token activations,
-- stored compactly as int8 codes: act ≈ code / 127 * scale, with scale = max |act| over the row.
-- acts and scale are NULL when the source published only the text and the peak value (Transluce).
CREATE TABLE IF NOT EXISTS exemplars (
    layer    INTEGER NOT NULL,
    neuron   INTEGER NOT NULL,
    polarity TINYINT NOT NULL,    -- +1, -1, or 0 for split = 'random'
    split    VARCHAR NOT NULL,
    rank     INTEGER NOT NULL,
    seq_id   INTEGER NOT NULL,
    max_act  FLOAT NOT NULL,
    scale    FLOAT,                -- NULL: no per-token activations (imported text only)
    acts     TINYINT[]
);

-- Only `python -m cache import transluce --keep-source-embeddings` adds a table
--   source_embeddings (layer, neuron, polarity, vec FLOAT[d]): the publisher's own description embeddings
-- (Transluce: OpenAI text-embedding-ada-002, d = 1536), kept as published and not used for search.

-- Extreme quantiles of each neuron's activation over all corpus tokens (an import stores the
-- quantiles its source published, e.g. Transluce's 1e-7 … 1 − 1e-7, or only the max as q = 1).
-- q in {0, 1e-5, 1e-4, 1e-3, 1-1e-3, 1-1e-4, 1-1e-5, 1}; 0 and 1 are the min and max.
-- Linear interpolation between order statistics (numpy's default), exact for the corpus.
CREATE TABLE IF NOT EXISTS quantiles (
    layer  INTEGER NOT NULL,
    neuron INTEGER NOT NULL,
    q      DOUBLE NOT NULL,
    value  FLOAT NOT NULL,
    PRIMARY KEY (layer, neuron, q)
);
