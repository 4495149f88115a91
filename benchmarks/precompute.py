"""Benchmark: the precompute pass and the database search.

``python -m benchmarks.precompute --json`` prints one JSON object:

* ``collect_ratio``: throughput of (forward + activation capture + exemplar/quantile
  collection) ÷ throughput of a bare forward, on the same batches of the default corpus,
  in one run (target ≥ 0.85). Both run ``model.model`` (the decoder, no LM head), as the
  build does. Batches alternate bare / collected so machine noise hits both alike.
* ``search_ms_db``: median top-500 semantic search over a real database (``--db``,
  default the embedded model's), with ``search_vs_numpy_db`` against NumPy brute force.
* ``search_ms_458k`` / ``search_vs_numpy``: the same over a synthetic 458,752 × 384
  table, the size of Llama-3.1-8B (target ≤ 150 ms), from :mod:`benchmarks.search`.
* ``build_wall_s``: the full build's wall time, read from the build folder's stage
  markers (``--build`` runs the build first if the database is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def collect_ratio(model: str = "embedded", batches: int = 24, batch_size: int = 16) -> dict:
    from engine.hooks import NeuronHooks
    from engine.loader import load_model
    from precompute.collect import Collector, extremes_needed
    from precompute.corpus import build_corpus

    lm = load_model(model)
    corpus = build_corpus(lm.tokenizer, profile="default", progress=False)
    n = min(len(corpus), batches * batch_size)
    ids = torch.from_numpy(corpus.token_ids[:n].astype(np.int64))
    order = np.random.default_rng(0).permutation(len(corpus))
    col = Collector(lm.n_layers * lm.n_neurons, corpus.seq_len, 20,
                    extremes_needed(len(corpus) * (corpus.seq_len - 1)), order[:20].tolist())
    bare_t, coll_t = [], []
    with torch.inference_mode():
        lm.model.model(input_ids=ids[:batch_size])  # warm-up
        for b in range(0, n, batch_size):
            x = ids[b : b + batch_size]
            t0 = time.perf_counter()
            lm.model.model(input_ids=x)
            bare_t.append(time.perf_counter() - t0)
            with NeuronHooks(lm, capture=True) as hooks:
                t0 = time.perf_counter()
                lm.model.model(input_ids=x)
                col.update_layers(torch.arange(b, b + len(x)), hooks.captured)
                coll_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        col.flush()
        flush_s = time.perf_counter() - t0
    tokens = n * corpus.seq_len
    return {
        "batches": len(bare_t), "batch_size": batch_size, "seq_len": corpus.seq_len,
        "bare_tokens_per_s": round(tokens / sum(bare_t), 1),
        "collect_tokens_per_s": round(tokens / (sum(coll_t) + flush_s), 1),
        "collect_ratio": round(sum(bare_t) / (sum(coll_t) + flush_s), 3),
        "collect_ratio_second_half": round(sum(bare_t[len(bare_t) // 2 :]) / sum(coll_t[len(coll_t) // 2 :]), 3),
        "median_bare_batch_s": round(statistics.median(bare_t), 3),
        "median_collect_batch_s": round(statistics.median(coll_t), 3),
    }


def search_db(db_path: Path, k: int = 500, repeats: int = 15) -> dict:
    from cache.db import open_database

    db = open_database(db_path)
    idx = db.index  # load the matrix once, as the app does
    rng = np.random.default_rng(0)
    q = rng.standard_normal(db.embedding_dim).astype(np.float32)
    q /= np.linalg.norm(q)
    db.semantic_search(q, k=k)
    ours, ref = [], []
    mat = idx.mat  # [n, d] unit rows
    for _ in range(repeats):
        t0 = time.perf_counter()
        db.semantic_search(q, k=k)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        s = mat @ q
        top = np.argpartition(-s, k)[:k]
        top[np.argsort(-s[top])]
        ref.append(time.perf_counter() - t0)
    return {"search_ms_db": round(1e3 * statistics.median(ours), 2),
            "search_vs_numpy_db": round(statistics.median(ours) / statistics.median(ref), 2),
            "db_rows": int(mat.shape[0])}


def build_wall(build_root: Path) -> float | None:
    """Seconds from the build's first start to the write stage's marker, and per stage.

    Wall time includes any pauses if the build was interrupted and resumed."""
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    started, done = build_root / "started", build_root / "write.done"
    if not (started.exists() and done.exists()):
        return None
    end = datetime.strptime(json.loads(done.read_text())["finished"], fmt).timestamp()
    start = datetime.strptime(started.read_text().strip(), fmt).timestamp()
    stages = {}
    prev = start
    for name in ("corpus", "activations", "exemplars", "descriptions", "scores", "embeddings", "write"):
        marker = build_root / f"{name}.done"
        if marker.exists():
            t = datetime.strptime(json.loads(marker.read_text())["finished"], "%Y-%m-%dT%H:%M:%SZ").timestamp()
            stages[name] = round(t - prev)
            prev = t
    return {"build_wall_s": round(end - start), "stage_s": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--db", default=None)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--skip-458k", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from cache.paths import db_path
    from engine.loader import cache_dir, model_slug

    out = {"model": args.model, "threads": torch.get_num_threads()}
    out.update(collect_ratio(args.model, args.batches))
    db = Path(args.db) if args.db else db_path(args.model)
    if db.exists():
        out.update(search_db(db))
        wall = build_wall(cache_dir() / "build" / model_slug(args.model))
        if wall:
            out.update(wall)
    if not args.skip_458k:
        from benchmarks.search import bench_search

        res = bench_search()
        out.update({k: v for k, v in res.items() if k in ("search_ms_458k", "search_vs_numpy", "numpy_ms_458k", "sql_ms_458k")})
    out["targets"] = {"collect_ratio": 0.85, "search_ms_458k": 150}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
