"""The neuron database: writer, validation, search and lookups on small synthetic databases."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache.codec import decode_acts, encode_acts  # noqa: E402
from cache.db import RESULT_COLUMNS, open_database  # noqa: E402
from cache.paths import tmp_path as build_tmp  # noqa: E402
from cache.schema import COLUMNS, REQUIRED_META, SCHEMA_VERSION  # noqa: E402
from cache.writer import DatabaseWriter  # noqa: E402
from engine.errors import MonitorError  # noqa: E402

L, N, D, T = 3, 50, 32, 12
QS = [0.0, 1e-5, 1e-4, 1e-3, 1 - 1e-3, 1 - 1e-4, 1 - 1e-5, 1.0]
SPECIAL = {  # (layer, neuron, polarity) → description text with SQL metacharacters
    (0, 1, 1): "fires on 100% certain claims",
    (0, 2, 1): "fires on 100 percent claims",
    (1, 3, -1): "matches snake_case identifiers",
    (1, 4, -1): "matches snakeXcase words",
    (2, 5, 1): "apostrophes as in it's and don't",
}


def meta(**over) -> dict:
    base = {k: "x" for k in REQUIRED_META if k not in ("schema_version", "embedding_dim", "build_time")}
    base.update(model_id="test/model", model_slug="test-model", n_layers=L, n_neurons=N, seq_len=T,
                embedding_model="random")
    base.update(over)
    return base


class Synthetic:
    """The arrays a synthetic database was written from (the ground truth for the tests)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        keys = [(l, n, p) for l in range(L) for n in range(N) for p in (1, -1)]
        self.layer = np.array([k[0] for k in keys])
        self.neuron = np.array([k[1] for k in keys])
        self.polarity = np.array([k[2] for k in keys])
        raw = rng.standard_normal((len(keys), D)).astype(np.float32) * rng.uniform(0.5, 3, (len(keys), 1))
        self.raw = raw.astype(np.float32)  # [n, d], not normalised: the writer must normalise
        self.unit = self.raw / np.linalg.norm(self.raw, axis=1, keepdims=True)
        self.score = rng.uniform(-0.2, 0.9, len(keys))
        self.score[rng.random(len(keys)) < 0.1] = np.nan  # some unscored
        self.auc = rng.uniform(0, 1, len(keys))
        self.auc[rng.random(len(keys)) < 0.1] = np.nan
        self.text = [SPECIAL.get(k, f"topic {i % 7} of neuron {k[0]}/{k[1]}") for i, k in enumerate(keys)]
        self.seq_text = [f"sequence number {s} text" for s in range(20)]
        self.tokens = [[f"t{s}_{j}" for j in range(T)] for s in range(20)]
        ex = []
        for i, (l, n, p) in enumerate(keys):
            if (l, n) == (2, 49):
                continue  # one neuron without exemplars: top_exemplar must be NULL
            for split, rank in (("train", 0), ("train", 1), ("test", 0)):
                ex.append((l, n, p, split, rank, int(rng.integers(20))))
        for l, n in [(0, 0), (1, 7)]:
            ex.append((l, n, 0, "random", 0, int(rng.integers(20))))
        self.exemplars = pd.DataFrame(ex, columns=["layer", "neuron", "polarity", "split", "rank", "seq_id"])
        self.acts = rng.standard_normal((len(ex), T)).astype(np.float32) * 5  # [n_ex, T]
        self.quant = rng.standard_normal((L, N, len(QS))).astype(np.float32)  # [L, N, Q]
        self.keys = keys

    def write(self, path: Path, finish: bool = True, **meta_over) -> DatabaseWriter:
        w = DatabaseWriter(path, embedding_dim=D)
        w.write_meta(meta(**meta_over))
        w.write_neurons(pd.DataFrame({"layer": np.repeat(range(L), N), "neuron": np.tile(range(N), L),
                                      "promotes": [["a", "b"]] * (L * N), "suppresses": [["c"]] * (L * N)}))
        w.write_sequences(pd.DataFrame({"seq_id": range(20), "source": ["bible"] * 10 + ["pydoc"] * 10,
                                        "text": self.seq_text, "tokens": self.tokens}))
        w.write_descriptions(pd.DataFrame({
            "layer": self.layer, "neuron": self.neuron, "polarity": self.polarity, "text": self.text,
            "summary": [f"summary {i}" for i in range(len(self.keys))], "score": self.score, "explainer": "test",
            "score_scorer": np.where(np.isnan(self.score), None, "sim-x")}))
        n = len(self.keys)
        w.write_scores(pd.DataFrame({
            "layer": np.tile(self.layer, 2), "neuron": np.tile(self.neuron, 2), "polarity": np.tile(self.polarity, 2),
            "scorer": ["sim-x"] * n + ["auc-x"] * n, "version": ["1"] * (2 * n),
            "value": np.concatenate([self.score, self.auc]), "split": ["test"] * (2 * n), "n": [25] * (2 * n),
            "detail": [None] * (2 * n)}))
        # embeddings in two batches, out of key order
        half = len(self.keys) // 2
        for sl in (slice(half, None), slice(0, half)):
            w.write_embeddings(self.layer[sl], self.neuron[sl], self.polarity[sl], self.raw[sl])
        codes, scale = encode_acts(self.acts)
        ex = self.exemplars.copy()
        ex["max_act"] = self.acts.max(axis=1)
        ex["scale"] = scale
        ex["acts"] = list(codes)
        w.write_exemplars(ex)
        li, ni, qi = np.meshgrid(range(L), range(N), range(len(QS)), indexing="ij")
        w.write_quantiles(pd.DataFrame({"layer": li.ravel(), "neuron": ni.ravel(), "q": np.array(QS)[qi.ravel()],
                                        "value": self.quant.ravel()}))
        if finish:
            w.finish()
        return w

    def expected(self, q: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        sims = self.unit @ (q / np.linalg.norm(q))
        idx = np.arange(len(sims)) if keep is None else np.flatnonzero(keep)
        idx = idx[np.argsort(-sims[idx], kind="stable")][:k]
        return idx, sims[idx]


@pytest.fixture(scope="module")
def synth() -> Synthetic:
    return Synthetic()


@pytest.fixture(scope="module")
def db(synth, tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "test-model.duckdb"
    synth.write(path)
    with open_database(path) as handle:
        yield handle


def keys_of(df: pd.DataFrame) -> list[tuple]:
    return list(zip(df["layer"], df["neuron"], df["polarity"]))


# ---------------------------------------------------------------- writer


def test_writer_publishes_atomically(synth, tmp_path):
    path = tmp_path / "m.duckdb"
    w = synth.write(path, finish=False)
    assert not path.exists() and build_tmp(path).exists()
    w.finish()
    assert path.exists() and not build_tmp(path).exists()
    # a second, unfinished build leaves the published database untouched
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with DatabaseWriter(path, embedding_dim=D) as w2:
            w2.write_meta(meta())
            raise RuntimeError("killed")
    assert path.read_bytes() == before and build_tmp(path).exists()
    with open_database(path) as handle:
        assert handle.counts()["embeddings"] == len(synth.keys)


def test_writer_checks_inputs(tmp_path):
    w = DatabaseWriter(tmp_path / "x.duckdb", embedding_dim=D)
    with pytest.raises(ValueError, match="missing"):
        w.write_quantiles(pd.DataFrame({"layer": [0], "neuron": [0], "q": [0.5]}))
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        w.write_embeddings([0], [0], [1], np.ones((1, 8)))
    with pytest.raises(ValueError, match="polarity"):
        w.write_embeddings([0], [0], [0], np.ones((1, D)))
    with pytest.raises(ValueError, match="meta keys missing"):
        w.finish()
    w.close()
    assert not (tmp_path / "x.duckdb").exists()


def test_vectors_stored_normalised_with_real_dim(db, synth):
    with db.cursor() as cur:
        (typ,), = cur.execute("SELECT data_type FROM duckdb_columns() WHERE table_name='embeddings' "
                              "AND column_name='vec'").fetchall()
        norms = cur.execute("SELECT min(sqrt(list_dot_product(vec::FLOAT[], vec::FLOAT[]))), "
                            "max(sqrt(list_dot_product(vec::FLOAT[], vec::FLOAT[]))) FROM embeddings").fetchall()[0]
    assert typ == f"FLOAT[{D}]"
    assert abs(norms[0] - 1) < 1e-5 and abs(norms[1] - 1) < 1e-5
    assert db.meta["schema_version"] == SCHEMA_VERSION == "2" and db.meta["embedding_dim"] == str(D)
    assert np.allclose(db.embedding(1, 3, -1), synth.unit[synth.keys.index((1, 3, -1))], atol=1e-6)


def test_codec_error_bound():
    acts = np.random.default_rng(1).standard_normal((5, 40)).astype(np.float32) * 30
    acts[2] = 0
    codes, scale = encode_acts(acts)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    err = np.abs(decode_acts(codes, scale) - acts)
    assert np.all(err <= scale[:, None] / 254 + 1e-5)
    assert np.all(decode_acts(codes[2], scale[2]) == 0)


# ---------------------------------------------------------------- semantic search


def test_semantic_search_matches_numpy_cosine(db, synth):
    rng = np.random.default_rng(7)
    for _ in range(3):
        q = rng.standard_normal(D).astype(np.float32) * 4  # not unit: cosine must normalise
        hits = db.semantic_search(q, k=25)
        idx, sims = synth.expected(q, 25)
        assert list(hits.columns) == RESULT_COLUMNS
        assert keys_of(hits) == [synth.keys[i] for i in idx]
        assert np.allclose(hits["similarity"].to_numpy(), sims, atol=1e-5)
        assert list(hits["description"]) == [synth.text[i] for i in idx]
        assert hits["similarity"].is_monotonic_decreasing


def test_search_result_joins_top_exemplar(db, synth):
    for i in (0, synth.keys.index((2, 49, 1))):
        hits = db.semantic_search(synth.raw[i], k=1)
        assert keys_of(hits) == [synth.keys[i]]
        assert abs(hits["similarity"][0] - 1) < 1e-5
        ex = synth.exemplars
        top = ex[(ex.layer == synth.keys[i][0]) & (ex.neuron == synth.keys[i][1]) & (ex.polarity == synth.keys[i][2])
                 & (ex.split == "train") & (ex["rank"] == 0)]
        if len(top):
            assert hits["top_exemplar"][0] == synth.seq_text[int(top.seq_id.iloc[0])]
        else:
            assert pd.isna(hits["top_exemplar"][0])


def test_filters_apply_before_top_k(db, synth):
    q = np.random.default_rng(3).standard_normal(D)
    keep = (synth.layer == 1) & (synth.polarity == -1) & (synth.score >= 0.3)
    n_keep = int(keep.sum())
    assert 5 < n_keep < 40
    for k in (5, 100):
        hits = db.semantic_search(q, k=k, layer_range=(1, 1), polarity=-1, min_score=0.3)
        idx, sims = synth.expected(q, k, keep)
        assert len(hits) == min(k, n_keep)
        assert keys_of(hits) == [synth.keys[i] for i in idx]
        assert np.allclose(hits["similarity"], sims, atol=1e-5)
        assert (hits["score"] >= 0.3).all()
    hits = db.semantic_search(q, k=10, keyword="TOPIC 3")
    expect = np.array(["topic 3" in t for t in synth.text])
    idx, _ = synth.expected(q, 10, expect)
    assert keys_of(hits) == [synth.keys[i] for i in idx]


def test_search_argument_errors(db):
    with pytest.raises(MonitorError, match="0 <= lo <= hi <= 2"):
        db.semantic_search(np.ones(D), layer_range=(2, 5))
    with pytest.raises(MonitorError, match="dimensions"):
        db.semantic_search(np.ones(D + 1))
    with pytest.raises(MonitorError, match="Polarity"):
        db.semantic_search(np.ones(D), polarity=0)


def test_concurrent_searches_share_one_database(db, synth):
    qs = np.random.default_rng(11).standard_normal((16, D))
    expected = [keys_of(db.semantic_search(q, k=10)) for q in qs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = keys_of(db.semantic_search(qs[i], k=10))
                db.neuron(i % L, i)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(qs))] == expected


def test_nearest_neurons_excludes_itself(db, synth):
    i = synth.keys.index((0, 10, 1))
    near = db.nearest_neurons(0, 10, 1, k=5)
    sims = synth.unit @ synth.unit[i]
    sims[i] = -np.inf
    assert keys_of(near) == [synth.keys[j] for j in np.argsort(-sims)[:5]]


# ---------------------------------------------------------------- keyword search


@pytest.mark.parametrize("text, expected", [
    ("%", [(0, 1, 1)]),
    ("100%", [(0, 1, 1)]),
    ("_", [(1, 3, -1)]),
    ("SNAKE_CASE", [(1, 3, -1)]),
    ("it's", [(2, 5, 1)]),
    ("'; DROP TABLE descriptions; --", []),
    ("\\", []),
])
def test_keyword_search_is_literal(db, text, expected):
    hits = db.keyword_search(text, k=500)
    assert sorted(keys_of(hits)) == sorted(expected)
    assert hits["similarity"].isna().all()
    assert db.counts()["descriptions"] == L * N * 2


def test_keyword_search_orders_by_score_and_filters(db, synth):
    hits = db.keyword_search("topic 2", k=500, polarity=1)
    expect = [i for i, t in enumerate(synth.text) if "topic 2" in t and synth.polarity[i] == 1]
    assert sorted(keys_of(hits)) == sorted(synth.keys[i] for i in expect)
    scores = hits["score"].dropna().to_numpy()
    assert np.all(np.diff(scores) <= 0) and hits["score"].isna().sum() == np.isnan(synth.score[expect]).sum()
    assert len(db.keyword_search("topic", k=7)) == 7
    assert len(db.keyword_search("summary 1", k=500, min_score=0.5)) == sum(
        1 for i in range(len(synth.keys)) if f"summary {i}".startswith("summary 1") and synth.score[i] >= 0.5)
    with pytest.raises(MonitorError, match="empty"):
        db.keyword_search("  ")


# ---------------------------------------------------------------- lookups


def test_neuron_lookup_round_trips(db, synth):
    info = db.neuron(0, 0)
    assert info["promotes"] == ["a", "b"] and info["suppresses"] == ["c"]
    assert set(info["descriptions"]) == {1, -1}
    assert info["descriptions"][1]["text"] == synth.text[synth.keys.index((0, 0, 1))]
    assert list(info["quantiles"]) == QS
    assert np.allclose(list(info["quantiles"].values()), synth.quant[0, 0])
    ex = synth.exemplars
    rows = ex[(ex.layer == 0) & (ex.neuron == 0)]
    assert len(info["exemplars"]) == len(rows)
    assert [e["polarity"] for e in info["exemplars"]] == [1, 1, 1, -1, -1, -1, 0]
    for e in info["exemplars"]:
        i = rows[(rows.polarity == e["polarity"]) & (rows.split == e["split"]) & (rows["rank"] == e["rank"])].index[0]
        truth = synth.acts[i]
        assert e["seq_id"] == ex.seq_id[i] and e["tokens"] == synth.tokens[e["seq_id"]]
        assert e["source"] in ("bible", "pydoc") and len(e["acts"]) == T
        assert np.max(np.abs(np.array(e["acts"]) - truth)) <= np.abs(truth).max() / 254 + 1e-4


def test_neuron_out_of_range(db):
    with pytest.raises(MonitorError, match=r"0\.\.2"):
        db.neuron(3, 0)
    with pytest.raises(MonitorError, match=r"0\.\.49"):
        db.neuron(0, 50)


def test_quantile_table(db, synth):
    for qi, q in enumerate(QS):
        table = db.quantile_table(q)
        assert table.shape == (L, N) and table.dtype == np.float32
        assert np.array_equal(table, synth.quant[:, :, qi])
    assert db.nearest_quantile(1 - 1e-7) == 1.0 and db.nearest_quantile(2e-5) == 1e-5
    assert np.array_equal(db.quantile_table(1 - 1e-7), synth.quant[:, :, -1])
    with pytest.raises(MonitorError):
        db.quantile_table(1.5)


def test_descriptions_for_keeps_order(db, synth):
    pairs = [(2, 5), (0, 1), (2, 5), (1, 49)]
    df = db.descriptions_for(pairs)
    assert list(zip(df.layer, df.neuron)) == pairs
    for row, (l, n) in zip(df.itertuples(), pairs):
        assert row.description_pos == synth.text[synth.keys.index((l, n, 1))]
        assert row.description_neg == synth.text[synth.keys.index((l, n, -1))]
    assert len(db.descriptions_for([])) == 0


# ---------------------------------------------------------------- validation


def assert_rebuild_hint(err: pytest.ExceptionInfo, model: str) -> None:
    msg = str(err.value)
    assert "python -m precompute build" in msg and f"--model {model}" in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(MonitorError, match="No neuron database") as err:
        open_database(tmp_path / "smollm2-135m-instruct.duckdb")
    assert_rebuild_hint(err, "embedded")


def test_leftover_tmp_means_interrupted_build(tmp_path, synth):
    path = tmp_path / "some-model.duckdb"
    synth.write(path, finish=False).close()
    with pytest.raises(MonitorError, match="did not finish.*resume") as err:
        open_database(path)
    assert_rebuild_hint(err, "some-model")


def test_corrupt_file(tmp_path):
    path = tmp_path / "smollm2-135m-instruct.duckdb"
    path.write_bytes(np.random.default_rng(0).bytes(50_000))
    with pytest.raises(MonitorError, match="not a readable DuckDB") as err:
        open_database(path)
    assert_rebuild_hint(err, "embedded")


def test_foreign_duckdb_file(tmp_path):
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE TABLE sales (id INTEGER, amount DOUBLE)")
    with pytest.raises(MonitorError, match="not a neuron database") as err:
        open_database(path)
    assert_rebuild_hint(err, "other")


def test_schema_version_mismatch(tmp_path, synth):
    path = tmp_path / "old.duckdb"
    w = synth.write(path, finish=False)
    w.write_meta({"schema_version": "0"})
    w.finish()
    with pytest.raises(MonitorError, match="schema version 0") as err:
        open_database(path)
    assert_rebuild_hint(err, "test/model")


def test_version_1_file_opens_read_only_without_scores(tmp_path, synth):
    """A database written before schema 2 (no scores table, no descriptions.score_scorer) still reads."""
    path = tmp_path / "v1.duckdb"
    w = synth.write(path, finish=False, scorer="offline-token-match-v1")
    w.conn.execute("DROP TABLE scores")
    w.conn.execute("ALTER TABLE descriptions DROP COLUMN score_scorer")
    w.write_meta({"schema_version": "1"})
    w.finish()
    with open_database(path) as old:
        assert old.version == "1" and "scores" not in old.counts()
        assert not old.has_scores and old.scorers() == []
        assert old.counts()["descriptions"] == len(synth.keys)
        empty = old.scores_for(1, 3)
        assert empty.empty and list(empty.columns) == list(COLUMNS["scores"])
        scored = next(k for k, s in zip(synth.keys, synth.score) if not np.isnan(s))
        d = old.neuron(scored[0], scored[1])["descriptions"][scored[2]]
        assert d["scorer"] == "offline-token-match-v1" and d["score"] == pytest.approx(
            synth.score[synth.keys.index(scored)])
        assert len(old.semantic_search(synth.unit[0], k=3)) == 3
    with pytest.raises(MonitorError, match="schema version 1"):
        open_database(path, read_only=False)


def test_scores_table_round_trip(tmp_path, synth):
    path = tmp_path / "v2.duckdb"
    w = synth.write(path, finish=False)
    rows = pd.DataFrame({"layer": [1, 1, 1], "neuron": [3, 3, 3], "polarity": [1, 1, -1],
                         "scorer": ["b-scorer", "a-scorer", "a-scorer"], "version": ["2", "1", "1"],
                         "value": [0.5, np.nan, -0.25], "split": ["test", "source", "train"], "n": [40, None, 7],
                         "detail": ['{"source": "x"}', None, None]})
    w.write_scores(rows)
    with pytest.raises(ValueError, match="unknown split"):
        w.write_scores(rows.assign(split="held-out"))
    w.finish()
    with open_database(path) as db2:
        got = db2.scores_for(1, 3)
        got = got[got.scorer.isin(["a-scorer", "b-scorer"])]  # the synthetic database's own scorers aside
        assert list(got["scorer"]) == ["a-scorer", "b-scorer", "a-scorer"]  # +1 first, then by scorer
        assert list(got["polarity"]) == [1, 1, -1] and got["value"].isna().tolist() == [True, False, False]
        assert got["n"].tolist()[1:] == [40, 7] and not db2.scores_for(0, 0).scorer.isin(["a-scorer", "b-scorer"]).any()


# ---------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_missing_database_exits_2(tmp_path):
    proc = run_cli("info", "--db", str(tmp_path / "nothing.duckdb"))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "python -m precompute build" in lines[0] and "Traceback" not in proc.stderr


def test_cli_keyword_neuron_info(db, capsys):
    from cache.__main__ import main

    assert main(["keyword", "100%", "--db", str(db.path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["neuron"], r["polarity"]) for r in rows] == [(0, 1, 1)]
    assert set(rows[0]) == {"layer", "neuron", "polarity", "description", "score", "similarity", "top_exemplar"}
    assert main(["neuron", "1", "7", "--db", str(db.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == 1 and info["exemplars"][-1]["split"] == "random"
    assert main(["info", "--db", str(db.path)]) == 0
    assert f"embeddings={L * N * 2:,}" in capsys.readouterr().out
    assert main(["neuron", "9", "0", "--db", str(db.path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- real embedder


def test_real_embedder_ranks_bible_verses(tmp_path, capsys):
    from cache.embedder import embed

    texts = ["fires on chapter:verse references in Bible text", "Python function definitions"]
    vecs = embed(["Bible verses"] + texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.1

    # end to end through the CLI: the Bible neuron ranks first
    path = tmp_path / "tiny.duckdb"
    with DatabaseWriter(path, embedding_dim=384) as w:
        w.write_meta(meta(n_layers=1, n_neurons=2))
        w.write_descriptions(pd.DataFrame({"layer": [0, 0], "neuron": [0, 1], "polarity": [1, 1], "text": texts,
                                           "summary": ["bible", "python"], "score": [0.5, 0.6],
                                           "explainer": "test"}))
        w.write_embeddings([0, 0], [0, 1], [1, 1], vecs[1:])
    from cache.__main__ import main

    assert main(["search", "Bible verses", "--db", str(path), "--k", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["neuron"] for r in rows] == [0, 1] and rows[0]["similarity"] > rows[1]["similarity"]
    for rank in ("behaviour", "summary"):  # no candidate at all: "no matches", in either order, with --why
        assert main(["search", "Bible verses", "--db", str(path), "--keyword", "zzz-nowhere", "--why", "--rank", rank]) == 0
        assert "(no matches)" in capsys.readouterr().out


# --------------------------------------------------------------------------- scores table (schema 2)
def test_scores_table_lookups_and_scorer_filter(tmp_path, synth):
    path = tmp_path / "scores.duckdb"
    synth.write(path, scorers=json.dumps([{"name": "sim-x", "version": "1", "description": "a correlation"}]))
    with open_database(path) as db:
        assert [d["name"] for d in db.scorers()] == ["sim-x", "auc-x"]  # meta's order, then the rest
        rows = db.scores_for(1, 3)
        assert len(rows) == 4 and set(rows.scorer) == {"sim-x", "auc-x"} and list(rows.polarity[:2]) == [1, 1]
        i = synth.keys.index((1, 3, 1))
        got = rows[(rows.polarity == 1) & (rows.scorer == "auc-x")].value.iloc[0]
        assert (np.isnan(got) and np.isnan(synth.auc[i])) or got == pytest.approx(synth.auc[i])
        # min_score on another scorer filters before the top-k, like brute force
        q = np.random.default_rng(5).standard_normal(D).astype(np.float32)
        hits = db.semantic_search(q, k=15, min_score=0.5, scorer="auc-x")
        idx, sims = synth.expected(q, 15, keep=synth.auc >= 0.5)
        assert list(zip(hits.layer, hits.neuron, hits.polarity)) == [synth.keys[j] for j in idx]
        kw = db.keyword_search("topic 3", k=200, min_score=0.5, scorer="auc-x")
        want = {synth.keys[j] for j in range(len(synth.keys)) if "topic 3" in synth.text[j] and synth.auc[j] >= 0.5}
        assert set(zip(kw.layer, kw.neuron, kw.polarity)) == want
        wide = db.scores_wide(hits.layer.to_numpy(), hits.neuron.to_numpy(), hits.polarity.to_numpy())
        np.testing.assert_allclose(wide["auc-x"].to_numpy(), synth.auc[idx])
        assert db.neuron(1, 3)["descriptions"][1]["scorer"] in ("sim-x", None)
        with pytest.raises(MonitorError, match="not in this database"):
            db.semantic_search(q, k=5, min_score=0.1, scorer="nope")


def test_scores_writer_rejects_bad_rows(tmp_path):
    w = DatabaseWriter(tmp_path / "bad.duckdb", embedding_dim=D)
    row = {"layer": [0], "neuron": [0], "polarity": [1], "scorer": ["s"], "version": ["1"], "value": [0.5],
           "split": ["test"], "n": [3], "detail": [None]}
    with pytest.raises(ValueError, match="split"):
        w.write_scores(pd.DataFrame({**row, "split": ["valid"]}))
    with pytest.raises(ValueError, match="polarity"):
        w.write_scores(pd.DataFrame({**row, "polarity": [0]}))
    w.write_scores(pd.DataFrame({**row, "value": [np.nan]}))  # NaN is stored as NULL, never 0
    assert w.conn.execute("SELECT value IS NULL FROM scores").fetchone()[0]
    w.close()


def test_search_reasons_and_behaviour_ranking_against_separately_embedded_parts():
    """``match_reasons`` splits each summary into behaviour and source and reports the query's cosine
    to each (checked against embedding the parts here); ``rank_by_behaviour`` orders by
    b · (1 + 0.25 · max(s, 0)), so a neuron named by scripture tokens outranks one that fires on
    commas inside scripture although the latter's whole summary is closer to "Bible verses"."""
    from cache.embedder import embed
    from cache.search_explain import SOURCE_BOOST, match_reasons, rank_by_behaviour, split_summary

    assert split_summary("window start: ',', ' saying' in Bible verses") == ("',', ' saying'", "Bible verses")
    assert split_summary("' God', ' verse'") == ("' God', ' verse'", "")
    summaries = ["',', ' saying' in Bible verses", "' God', ' Lord'", "' and' after ',', ',' in Bible verses", ""]
    q = embed(["Bible verses"])[0]
    whole = embed([s or " " for s in summaries]) @ q
    hits = pd.DataFrame({"layer": [1, 2, 3, 4], "neuron": [10, 20, 30, 40], "polarity": [1, 1, -1, 1],
                         "summary": summaries, "description": ["Fires on ',' (15/15 top windows)."] * 4,
                         "similarity": whole})
    why = match_reasons(q, hits, embed)
    for i, s in enumerate(summaries[:3]):
        beh, src = split_summary(s)
        assert abs(why.behaviour_sim[i] - float(embed([beh])[0] @ q)) < 1e-5
        assert (src == "") == np.isnan(why.source_sim[i])
    assert "tokens in 15/15 top windows" in why.why[0] and why.why[0].startswith("matched mostly on its source label")
    ranked = rank_by_behaviour(q, hits, embed, k=3)
    b, s = why.behaviour_sim.to_numpy(), np.nan_to_num(why.source_sim.to_numpy())
    want = b * (1 + SOURCE_BOOST * np.clip(s, 0, None))
    assert list(ranked.neuron) == list(hits.neuron[np.argsort(-np.nan_to_num(want, nan=-np.inf), kind="stable")][:3])
    assert np.allclose(ranked.behaviour_rank, np.sort(want[~np.isnan(want)])[::-1][:3], atol=1e-6)
    assert whole[0] > whole[1] and ranked.neuron[0] == 20  # by summary the comma neuron wins; by behaviour ' God', ' Lord'
    empty = rank_by_behaviour(q, hits.iloc[:0], embed, k=3)  # no candidates (e.g. a --keyword matching nothing)
    assert empty.empty and {"behaviour_rank", "why", "summary"} <= set(empty.columns)
