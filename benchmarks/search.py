"""Benchmark semantic search over the neuron database; prints JSON.

    python -m benchmarks.search [--db data/smollm2-135m-instruct.duckdb] [--repeats 20]

Builds a synthetic database the size of Llama-3.1-8B's search space (32 layers × 7,168
neurons × 2 polarities = 458,752 embeddings of dimension 384) with
:class:`cache.writer.DatabaseWriter` in a temporary folder, then times top-500
:meth:`cache.db.NeuronDB.semantic_search` (median of ``repeats`` random queries, index
already loaded) against two baselines measured in the same run:

* ``numpy``: plain ``mat @ q`` + ``np.argpartition`` top-500 on the same matrix
  (``search_vs_numpy`` = ours ÷ this; ours adds the filters, the sort and the SQL join
  that fetches descriptions and top exemplars);
* ``sql``: pure DuckDB, ``array_inner_product(vec, ?) ... ORDER BY ... LIMIT 500``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_LAYERS, N_NEURONS, DIM, K = 32, 7168, 384, 500
SEQ_LEN, N_SEQUENCES = 16, 10_000


def _median_ms(fn, queries: np.ndarray) -> float:
    fn(queries[0])  # warm-up
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def build_synthetic(path: Path, seed: int = 0) -> dict:
    """Write a 458,752 × 384 database at ``path``; return its build timings."""
    from cache.codec import encode_acts
    from cache.schema import REQUIRED_META, SCHEMA_VERSION
    from cache.writer import DatabaseWriter

    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(N_LAYERS), N_NEURONS * 2)  # [n]
    neuron = np.tile(np.repeat(np.arange(N_NEURONS), 2), N_LAYERS)  # [n]
    polarity = np.tile([1, -1], N_LAYERS * N_NEURONS)  # [n]
    n = len(layer)
    t0 = time.perf_counter()
    vecs = rng.standard_normal((n, DIM), dtype=np.float32)  # [n, d]
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    with DatabaseWriter(path, embedding_dim=DIM) as w:
        meta = {k: "synthetic" for k in REQUIRED_META}
        meta.update(schema_version=SCHEMA_VERSION, model_id="synthetic-8b", model_slug="synthetic-8b", n_layers=N_LAYERS,
                    n_neurons=N_NEURONS, embedding_dim=DIM)
        w.write_meta(meta)
        w.write_sequences(pd.DataFrame({
            "seq_id": np.arange(N_SEQUENCES), "source": "synthetic",
            "text": [f"synthetic sequence {i}" for i in range(N_SEQUENCES)],
            "tokens": [[f"tok{j}" for j in range(SEQ_LEN)]] * N_SEQUENCES}))
        w.write_descriptions(pd.DataFrame({
            "layer": layer, "neuron": neuron, "polarity": polarity,
            "text": [f"synthetic description {i}" for i in range(n)], "summary": "synthetic",
            "score": rng.uniform(-0.1, 0.9, n), "explainer": "synthetic"}))
        w.write_embeddings(layer, neuron, polarity, vecs)
        codes, scale = encode_acts(rng.standard_normal((n, SEQ_LEN)).astype(np.float32))
        w.write_exemplars(pd.DataFrame({
            "layer": layer, "neuron": neuron, "polarity": polarity, "split": "train", "rank": 0,
            "seq_id": rng.integers(0, N_SEQUENCES, n), "max_act": scale, "scale": scale, "acts": list(codes)}))
    return {"rows": n, "dim": DIM, "generate_s": round(t_gen, 2), "build_s": round(time.perf_counter() - t0, 2),
            "size_mb": round(path.stat().st_size / 1e6, 1)}


def time_database(path: Path, repeats: int, with_sql: bool) -> dict:
    """Median top-500 timings on one database file."""
    from cache.db import open_database

    out: dict = {}
    with open_database(path) as db:
        queries = np.random.default_rng(1).standard_normal((repeats, db.embedding_dim)).astype(np.float32)
        t0 = time.perf_counter()
        index = db.index
        out["index_load_s"] = round(time.perf_counter() - t0, 2)
        out["rows"] = len(index)
        k = min(K, len(index))
        out["search_ms"] = _median_ms(lambda q: db.semantic_search(q, k=k), queries)
        lo, hi = 0, max(db.n_layers // 3, 0)
        out["search_filtered_ms"] = _median_ms(
            lambda q: db.semantic_search(q, k=k, layer_range=(lo, hi), polarity=1, min_score=0.2), queries)

        picks = np.random.default_rng(2).integers(0, [db.n_layers, db.n_neurons], (repeats, 2))
        out["neuron_ms"] = _median_ms(lambda p: db.neuron(int(p[0]), int(p[1])), picks)
        out["keyword_ms"] = _median_ms(lambda _: db.keyword_search("description 12", k=50), picks)

        def plain_numpy(q):
            sims = index.mat @ q
            return np.argpartition(-sims, k - 1)[:k]

        out["numpy_ms"] = _median_ms(plain_numpy, queries)
        if with_sql:
            sql = (f"SELECT layer, neuron, polarity, array_inner_product(vec, ?::FLOAT[{db.embedding_dim}]) AS sim "
                   f"FROM embeddings ORDER BY sim DESC LIMIT {k}")

            def pure_sql(q):
                with db.cursor() as cur:
                    return cur.execute(sql, [q.tolist()]).fetchall()

            out["sql_ms"] = _median_ms(pure_sql, queries[: max(repeats // 2, 3)])
        top = db.semantic_search(queries[0], k=k)
        idx = plain_numpy(queries[0] / np.linalg.norm(queries[0]))
        out["agrees_with_numpy"] = bool(set(zip(top.layer, top.neuron, top.polarity)) == set(
            zip(index.layer[idx].tolist(), index.neuron[idx].tolist(), index.polarity[idx].tolist())))
    return out


def bench_search(db: str | Path | None = None, repeats: int = 20) -> dict:
    """The benchmark's JSON record (see the module docstring)."""
    result: dict = {"k": K}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        path = Path(tmp) / "synthetic-8b.duckdb"
        result["build_458k"] = build_synthetic(path)
        timing = time_database(path, repeats, with_sql=True)
    result["search_ms_458k"] = round(timing["search_ms"], 2)
    result["search_filtered_ms_458k"] = round(timing["search_filtered_ms"], 2)
    result["numpy_ms_458k"] = round(timing["numpy_ms"], 2)
    result["sql_ms_458k"] = round(timing["sql_ms"], 2)
    result["search_vs_numpy"] = round(timing["search_ms"] / timing["numpy_ms"], 2)
    result["sql_vs_numpy"] = round(timing["sql_ms"] / timing["numpy_ms"], 2)
    result["neuron_ms_458k"] = round(timing["neuron_ms"], 2)
    result["keyword_ms_458k"] = round(timing["keyword_ms"], 2)
    result["index_load_s_458k"] = timing["index_load_s"]
    result["agrees_with_numpy"] = timing["agrees_with_numpy"]
    if db is not None:
        real = time_database(Path(db), repeats, with_sql=False)
        result["search_ms_db"] = round(real["search_ms"], 2)
        result["db"] = {"path": str(db), "rows": real["rows"], "index_load_s": real["index_load_s"],
                        "neuron_ms": round(real["neuron_ms"], 2), "keyword_ms": round(real["keyword_ms"], 2),
                        "search_vs_numpy": round(real["search_ms"] / real["numpy_ms"], 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None, help="also time a real database file")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(bench_search(args.db, args.repeats), indent=2))


if __name__ == "__main__":
    main()
