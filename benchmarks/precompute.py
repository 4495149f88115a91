"""Benchmark: the precompute pass and the database search.

``python -m benchmarks.precompute --json`` prints one JSON object:

* ``collect_ratio``: throughput of (forward + activation capture + exemplar/quantile
  collection) ÷ throughput of a bare forward, on the same batches of the default corpus,
  in one run (target ≥ 0.85). Both run ``model.model`` (the decoder, no LM head), as the
  build does. The pass covers the whole corpus in the build's shuffled order (the
  collector is dearest in the first batches, so a prefix understates the build's
  ratio; ``collect_ratio_first_fifth`` / ``_last_fifth`` show the spread), with a bare
  forward of every second batch interleaved so machine noise hits both alike.
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


def collect_ratio(model: str = "embedded", batches: int = 0, batch_size: int = 16, bare_every: int = 2) -> dict:
    """Collected vs bare forward throughput over the default corpus in the build's order.

    The collector's cost falls as the stream goes on (after the first batches few
    sequences enter a top list and few tokens beat the kept extremes), so only a whole
    pass gives the build's ratio; ``batches`` > 0 cuts it short (the early, dearer part).
    Every ``bare_every``-th batch is also run bare, interleaved, so drift hits both."""
    from engine.hooks import NeuronHooks
    from engine.loader import load_model
    from precompute.collect import Collector, extremes_needed
    from precompute.corpus import build_corpus

    lm = load_model(model)
    corpus = build_corpus(lm.tokenizer, profile="default", progress=False)
    ids = torch.from_numpy(corpus.token_ids.astype(np.int64))
    order = np.random.default_rng(0).permutation(len(corpus))
    chunks = [np.sort(order[i : i + batch_size]) for i in range(0, len(corpus), batch_size)]
    chunks = chunks[:batches] if batches > 0 else chunks
    col = Collector(lm.n_layers * lm.n_neurons, corpus.seq_len, 20,
                    extremes_needed(len(corpus) * (corpus.seq_len - 1)), order[:20].tolist())
    bare_t: dict[int, float] = {}
    coll_t: list[float] = []
    with torch.inference_mode():
        lm.model.model(input_ids=ids[chunks[0]])  # warm-up
        for j, idx in enumerate(chunks):
            x = ids[torch.from_numpy(idx)]
            with NeuronHooks(lm, capture=True) as hooks:
                t0 = time.perf_counter()
                lm.model.model(input_ids=x)
                col.update_layers(torch.from_numpy(idx), hooks.captured)
                coll_t.append(time.perf_counter() - t0)
            if j % bare_every == 0:  # no hooks at all
                t0 = time.perf_counter()
                lm.model.model(input_ids=x)
                bare_t[j] = time.perf_counter() - t0
        t0 = time.perf_counter()
        col.flush()
        flush_s = time.perf_counter() - t0

    tokens = [len(c) * corpus.seq_len for c in chunks]  # the last batch may be short

    def ratio(lo: int, hi: int, extra: float = 0.0) -> float:
        """Collected ÷ bare tokens per second over batches lo..hi−1."""
        bare = [j for j in bare_t if lo <= j < hi]
        bare_rate = sum(tokens[j] for j in bare) / sum(bare_t[j] for j in bare)
        return round(sum(tokens[lo:hi]) / (sum(coll_t[lo:hi]) + extra) / bare_rate, 3)

    n, fifth = len(coll_t), max(bare_every, len(coll_t) // 5)  # every segment holds a bare batch
    return {
        "batches": n, "batch_size": batch_size, "seq_len": corpus.seq_len, "bare_every": bare_every,
        "bare_tokens_per_s": round(sum(tokens[j] for j in bare_t) / sum(bare_t.values()), 1),
        "collect_tokens_per_s": round(sum(tokens) / (sum(coll_t) + flush_s), 1),
        "collect_ratio": ratio(0, n, flush_s),
        "collect_ratio_first_fifth": ratio(0, fifth),
        "collect_ratio_last_fifth": ratio(n - fifth, n),
        "median_bare_batch_s": round(statistics.median(bare_t.values()), 3),
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
    p.add_argument("--batches", type=int, default=0, help="cut the pass after this many batches (0: the whole corpus)")
    p.add_argument("--bare-every", type=int, default=2, help="time a bare forward on every n-th batch")
    p.add_argument("--skip-458k", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from cache.paths import db_path
    from engine.loader import data_dir, model_slug

    out = {"model": args.model, "threads": torch.get_num_threads()}
    out.update(collect_ratio(args.model, args.batches, bare_every=args.bare_every))
    db = Path(args.db) if args.db else db_path(args.model)
    if db.exists():
        out.update(search_db(db))
        wall = build_wall(data_dir() / "build" / model_slug(args.model))
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
