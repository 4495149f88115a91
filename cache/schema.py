"""The neuron database's schema as Python constants: version, tables, required meta keys.

``schema.sql`` is the source of truth for tables and columns; this module reads it and
substitutes the real embedding dimension into ``embeddings.vec FLOAT[d]``.
"""

from __future__ import annotations

import re
from pathlib import Path

SCHEMA_FILE = Path(__file__).with_name("schema.sql")

# Bump when a table or column changes meaning; readers refuse versions not in READABLE_VERSIONS.
# 2: the scores table, descriptions.score_scorer, nullable exemplars.acts/scale, split 'source'.
SCHEMA_VERSION = "2"

TABLES = ("meta", "neurons", "sequences", "descriptions", "embeddings", "exemplars", "quantiles", "scores")

# Versions a reader opens (read-only), and the tables each lacks: a version-1 file has no
# scores table and no descriptions.score_scorer, and is read as if both were empty.
READABLE_VERSIONS = ("1", "2")
ABSENT_IN = {"1": ("scores",)}

# Every key a finished build must carry (DatabaseWriter.finish checks them).
REQUIRED_META = (
    "schema_version", "model_id", "model_slug", "n_layers", "n_neurons", "seq_len", "n_sequences",
    "n_tokens", "corpus_sources", "corpus_hash", "explainer", "scorer", "embedding_model",
    "embedding_dim", "versions", "build_time",
)

# What an imported database carries instead of the corpus keys (see schema.sql).
IMPORTED_META = (
    "schema_version", "model_id", "model_slug", "n_layers", "n_neurons", "explainer", "scorer",
    "embedding_model", "embedding_dim", "versions", "build_time", "source", "lacks", "engine_model",
    "live_note", "import_command",
)

# The keys a reader needs to work at all (NeuronDB refuses a file without them).
READER_META = ("schema_version", "model_id", "n_layers", "n_neurons", "embedding_dim", "embedding_model")

# Column order of each table, as in schema.sql (writers insert by these names).
COLUMNS = {
    "neurons": ("layer", "neuron", "promotes", "suppresses"),
    "sequences": ("seq_id", "source", "text", "tokens"),
    "descriptions": ("layer", "neuron", "polarity", "text", "summary", "score", "explainer", "score_scorer"),
    "embeddings": ("layer", "neuron", "polarity", "vec"),
    "exemplars": ("layer", "neuron", "polarity", "split", "rank", "seq_id", "max_act", "scale", "acts"),
    "quantiles": ("layer", "neuron", "q", "value"),
    "scores": ("layer", "neuron", "polarity", "scorer", "version", "value", "split", "n", "detail"),
}

# The rows of each table are inserted in this order, so DuckDB's per-row-group min/max
# (zone maps) let a lookup of one neuron skip almost everything.
SORT_KEYS = {
    "neurons": ("layer", "neuron"),
    "sequences": ("seq_id",),
    "descriptions": ("layer", "neuron", "polarity"),
    "embeddings": ("layer", "neuron", "polarity"),
    "exemplars": ("layer", "neuron", "polarity", "split", "rank"),
    "quantiles": ("layer", "neuron", "q"),
    "scores": ("layer", "neuron", "polarity", "scorer"),
}

# Where a score was measured (scores.split).
SCORE_SPLITS = ("test", "train", "source")

_VEC_TYPE = re.compile(r"(\bvec\s+)FLOAT\[\d+\]")

# embeddings.vec element types a reader accepts: a build's unit float rows, or a bundle's int8 codes
# (cache/codec.py encode_unit_rows; readers renormalise them).
VEC_ELEMENT_TYPES = ("FLOAT", "TINYINT")


def schema_sql(embedding_dim: int, vec_element: str = "FLOAT") -> str:
    """``schema.sql`` with ``embeddings.vec`` typed ``<vec_element>[embedding_dim]``."""
    if int(embedding_dim) <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if vec_element not in VEC_ELEMENT_TYPES:
        raise ValueError(f"vec_element must be one of {VEC_ELEMENT_TYPES}, got {vec_element}")
    sql, n = _VEC_TYPE.subn(rf"\g<1>{vec_element}[{int(embedding_dim)}]", SCHEMA_FILE.read_text())
    if n != 1:
        raise RuntimeError(f"{SCHEMA_FILE} should declare exactly one `vec FLOAT[d]` column, found {n}")
    return sql
