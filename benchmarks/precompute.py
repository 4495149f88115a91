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
* ``build_wall_s``, ``stage_s``, ``corpus_tokens``: the build's wall time and per-stage
  seconds, read from the build folder's stage markers (``--build-dir``, default the
  model's), and its corpus size.
* ``forward``: bare forward tokens/s in fp32 and under bf16 autocast on the same batches
  (interleaved), their ratio, and the bf16 activations' error against fp32 (per neuron:
  sequence-max error over the neuron's range, median and 95th percentile; correlation,
  5th percentile); ``embed``: all-MiniLM-L6-v2 texts/s in fp32 and bf16 on summaries and
  on corpus windows. Both also as CPU-seconds rates (``*_cpu``): process CPU time ÷ cores
  is what the same work takes on an idle machine, so these project an idle build when the
  machine is shared.
* ``explainers``: the new (``offline-v3``, its summary form chosen on train windows as the
  build's scores stage does; ``new_bare_share`` is how often the bare form won) and old
  (``offline-v1``) explainers run on the same build's exemplars for a seeded sample of
  (neuron, polarity) keys, each scored by the same scorers on held-out windows: the
  token-match simulation (v2), the whole-window embedding AUC and the peak-span embedding
  AUC; mean, median and the share with no prediction (NULL), and ratios new ÷ old. Each
  span-AUC median comes with a **shuffled control**: the same descriptions scored on other
  keys' windows (5 seeded permutations), which should sit near 0.5. ``sim_ceiling_token_lookup``
  is what a per-token lookup table fitted on the train windows reaches on the same held-out
  windows: the most a context-free token-match description could score.
  ``sim_ceiling_candidates_on_heldout`` is, per key, the best held-out score among the new
  explainer's own candidates (it picks one on train windows): the most its candidate family can
  reach. ``auc_ceiling_train_centroid`` scores, in place of a summary, the normalised mean
  embedding of each key's train peak spans: what a text as close to the exemplars as their own
  average would reach on the embedding scorers.
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


def _rates(n: int, wall: float, cpu: float) -> tuple[float, float]:
    """(items/s by the wall clock, items/s projected on idle cores: CPU seconds ÷ threads)."""
    return round(n / wall, 1), round(n / (cpu / max(torch.get_num_threads(), 1)), 1)


def forward_precision(model: str = "embedded", batches: int = 6, batch_size: int = 16) -> dict:
    """fp32 vs bf16-autocast bare forward on the default corpus's first batches, interleaved, and
    the bf16 activations' error (see the module docstring)."""
    from engine.hooks import NeuronHooks
    from engine.loader import load_model
    from precompute.corpus import build_corpus

    lm = load_model(model)
    corpus = build_corpus(lm.tokenizer, profile="tiny", progress=False)
    ids = torch.from_numpy(corpus.token_ids.astype(np.int64))
    t = {False: [0.0, 0.0], True: [0.0, 0.0]}
    errs, corrs = [], []
    with torch.inference_mode():
        for j in range(batches + 1):
            x = ids[j * batch_size:(j + 1) * batch_size]
            acts = {}
            for bf16 in (False, True):
                with NeuronHooks(lm, capture=True) as hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    w0, c0 = time.perf_counter(), time.process_time()
                    lm.model.model(input_ids=x)
                    if j:  # the first batch warms up
                        t[bf16][0] += time.perf_counter() - w0
                        t[bf16][1] += time.process_time() - c0
                    acts[bf16] = torch.cat([h.float() for h in hooks.captured], dim=-1)[:, 1:].numpy()
            a, b = acts[False], acts[True]
            rng = np.maximum(a.max(axis=(0, 1)) - a.min(axis=(0, 1)), 1e-6)
            errs.append(np.abs(b.max(axis=1) - a.max(axis=1)).max(axis=0) / rng)
            xa, yb = a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2])
            xa, yb = xa - xa.mean(0), yb - yb.mean(0)
            corrs.append((xa * yb).sum(0) / np.sqrt((xa * xa).sum(0) * (yb * yb).sum(0) + 1e-30))
    n = batches * batch_size * corpus.seq_len
    f32, f32c = _rates(n, *t[False])
    b16, b16c = _rates(n, *t[True])
    err, corr = np.concatenate(errs), np.concatenate(corrs)
    return {"fp32_tokens_per_s": f32, "bf16_tokens_per_s": b16, "fp32_tokens_per_s_cpu": f32c,
            "bf16_tokens_per_s_cpu": b16c, "bf16_speedup": round(t[False][0] / t[True][0], 2),
            "bf16_speedup_cpu": round(t[False][1] / t[True][1], 2),
            "bf16_max_err_median": round(float(np.median(err)), 4), "bf16_max_err_p95": round(float(np.quantile(err, 0.95)), 4),
            "bf16_corr_p05": round(float(np.quantile(corr, 0.05)), 4)}


def embed_rates(db_path: Path, n: int = 1500) -> dict:
    """all-MiniLM-L6-v2 throughput, fp32 and bf16, on a database's summaries and windows."""
    import duckdb

    from cache.embedder import embed, load_embedder

    con = duckdb.connect(str(db_path), read_only=True)
    summ = [r[0] for r in con.execute(f"SELECT summary FROM descriptions USING SAMPLE {n} ROWS (reservoir, 0)").fetchall()]
    wins = [r[0] for r in con.execute(f"SELECT text FROM sequences USING SAMPLE {n // 4} ROWS (reservoir, 0)").fetchall()]
    con.close()
    load_embedder(), load_embedder(bulk=True)
    embed(summ[:100]), embed(summ[:100], bulk=True)
    out = {}
    for name, texts in (("summaries", summ), ("windows", wins)):
        for bulk in (False, True):
            w0, c0 = time.perf_counter(), time.process_time()
            embed(texts, bulk=bulk)
            wall, cpu = _rates(len(texts), time.perf_counter() - w0, time.process_time() - c0)
            key = f"{name}_{'bf16' if bulk else 'fp32'}_per_s"
            out[key], out[key + "_cpu"] = wall, cpu
    return out


def explainers(build_root: Path, model: str = "embedded", sample: int = 2000, seed: int = 0, show: int = 0) -> dict:
    """The new and old offline explainers on one build's exemplars, scored alike (held out);
    ``show`` > 0 adds that many keys drawn at random (seeded) with both descriptions and every score."""
    from cache.embedder import embed
    from engine.loader import load_model
    from precompute.collect import Collector
    from precompute.corpus import Corpus
    from precompute.describe import ContextStats, CorpusStats, OutputTokens, describe, describe_v1
    from cache.search_explain import bare_summary
    from precompute.embedding_score import (prefer_bare, score_keys, score_span_keys, span_starts, span_texts,
                                            top_span_rows)
    from precompute.exemplar_view import ExemplarView
    from precompute.simulate import Simulator

    lm = load_model(model)
    corpus = Corpus.load(build_root / "corpus.parquet")
    col = Collector.load(build_root / "merged.parquet")
    view = ExemplarView(col.state, col.k, corpus, lm.n_neurons, 1)
    stats = CorpusStats(corpus, 1)

    class Recording(Simulator):
        """Remembers every candidate the explainer simulates (``seen``), for the held-out ceiling of its candidates."""

        def __init__(self, strings):
            super().__init__(strings)
            self.seen: list[str] = []

        def scores(self, descriptions, polarity, windows):
            self.seen.extend(descriptions)
            return super().scores(descriptions, polarity, windows)

    sim = Recording(stats.strings)
    ctx = ContextStats(corpus.texts)
    outs = OutputTokens(lm)
    win_files = sorted((build_root / "embeddings").glob("windows-*.npy"))
    windows = np.concatenate([np.load(f) for f in win_files]) if win_files else embed(corpus.texts, bulk=True)
    starts = span_starts(corpus.seq_len, 1)
    span_files = sorted((build_root / "embeddings").glob("spans-*.npy"))
    spans = (np.concatenate([np.load(f) for f in span_files]) if span_files
             else embed(span_texts(corpus.tokens, starts), bulk=True))
    rng = np.random.default_rng(seed)
    keys = sorted({(int(l), int(n), int(p)) for l, n, p in zip(rng.integers(0, lm.n_layers, sample),
                                                              rng.integers(0, lm.n_neurons, sample),
                                                              rng.choice([1, -1], sample))})
    texts = {"new": [], "old": []}
    held, trains, lookup, oracle, centroids = [], [], [], [], []
    cache_out: dict = {}
    t_new = t_old = 0.0
    for layer, neuron, pol in keys:
        if layer not in cache_out:
            cache_out[layer] = outs.layer(layer)
        prom, supp = cache_out[layer][0][neuron], cache_out[layer][1][neuron]
        train = view.train(layer, neuron, pol, with_random=True)
        c0 = time.process_time()
        sim.seen.clear()
        text, summary, _ = describe(pol, train, stats, sim, prom, supp)
        t_new += time.process_time() - c0
        candidates = list(sim.seen)
        texts["new"].append((text, summary))
        c0 = time.process_time()
        n_top = train.n_top
        old = describe_v1(pol, train.tokens[:n_top], train.acts[:n_top], train.sources[:n_top], prom, supp, ctx)
        t_old += time.process_time() - c0
        texts["old"].append(old[:2])
        h = view.heldout(layer, neuron, pol)
        held.append(h)
        trains.append(train)  # prefer_bare reads its top exemplars only
        lookup.append(_lookup_score(train, h, pol, stats.vocab))
        # the best of the explainer's own candidates, picked on the held-out windows themselves
        oracle.append(max((v for v in sim.scores(candidates, pol, h) if v is not None), default=None))
        # the mean embedding of the train top windows' peak spans (unit length)
        c = spans[top_span_rows(train, pol, starts)].mean(axis=0)
        centroids.append(c / max(float(np.linalg.norm(c)), 1e-12))
    out = {"sample": len(keys), "held_out": "test top exemplars + held-out random windows, sink excluded",
           "describe_ms_per_key_cpu": {"new": round(1e3 * t_new / len(keys), 2), "old": round(1e3 * t_old / len(keys), 2)}}
    pols = [k[2] for k in keys]
    # the new explainer's summary form, chosen on train windows as the build does (scores stage)
    full = [summ for _, summ in texts["new"]]
    bare = [bare_summary(x) or x for x in full]
    pick = prefer_bare(embed(full, bulk=True), embed(bare, bulk=True), trains, pols, view.random_train_ids,
                       spans, starts)
    texts["new"] = [(t, b if p else f) for (t, f), b, p in zip(texts["new"], bare, pick)]
    out["new_bare_share"] = round(float(np.mean(pick)), 4)
    lk = np.array([np.nan if v is None else v for v in lookup])
    out["sim_ceiling_token_lookup"] = {"mean": round(float(np.nanmean(lk)), 4), "median": round(float(np.nanmedian(lk)), 4),
                                       "note": "Pearson r of a per-token lookup table (each token id's mean train "
                                               "activation) on the held-out windows: the best any token-match "
                                               "description could do without context"}
    orc = np.array([np.nan if v is None else v for v in oracle])
    out["sim_ceiling_candidates_on_heldout"] = {
        "mean": round(float(np.nanmean(orc)), 4), "median": round(float(np.nanmedian(orc)), 4),
        "note": "per key, the best held-out score among the new explainer's own candidates (which the explainer "
                "chooses on train windows): the most its candidate family can reach on this scorer"}
    pos_ids = [h.seq_ids[: h.n_top] for h in held]
    cen = np.asarray(centroids, np.float32)
    out["auc_ceiling_train_centroid"] = {
        "auc_median": round(float(np.nanmedian(score_keys(cen, pos_ids, view.random_test_ids, windows))), 4),
        "span_auc_median": round(float(np.nanmedian(score_span_keys(cen, held, pols, view.random_test_ids, spans,
                                                                    starts))), 4),
        "note": "not a description: the normalised mean embedding of each key's train peak spans, scored like a "
                "summary on the held-out windows; what a text as close to the exemplars as their own average reaches"}
    per_key: dict = {}
    for name, pairs in texts.items():
        s = np.array([np.nan if v is None else v for v in
                      (sim.score(t, k[2], h) for (t, _), k, h in zip(pairs, keys, held))])
        vecs = embed([summ for _, summ in pairs], bulk=True)
        auc = score_keys(vecs, pos_ids, view.random_test_ids, windows)
        span_auc = score_span_keys(vecs, held, pols, view.random_test_ids, spans, starts)
        # control: every description scored on another key's windows (5 seeded shuffles), a distribution
        control = [float(np.nanmedian(score_span_keys(vecs[perm], held, pols, view.random_test_ids, spans, starts)))
                   for perm in (np.random.default_rng(seed + 10 + r).permutation(len(keys)) for r in range(5))]
        out[name] = {"sim_mean": round(float(np.nanmean(s)), 4), "sim_median": round(float(np.nanmedian(s)), 4),
                     "sim_mean_null_as_0": round(float(np.nan_to_num(s).mean()), 4),
                     "sim_null_share": round(float(np.isnan(s).mean()), 4),
                     "auc_mean": round(float(np.nanmean(auc)), 4), "auc_median": round(float(np.nanmedian(auc)), 4),
                     "span_auc_mean": round(float(np.nanmean(span_auc)), 4),
                     "span_auc_median": round(float(np.nanmedian(span_auc)), 4),
                     "span_auc_median_shuffled_control": [round(c, 4) for c in control],
                     "summary_words_mean": round(float(np.mean([len(x.split()) for _, x in pairs])), 2)}
        per_key[name] = (s, auc, span_auc)
    if show:
        pick = np.random.default_rng(seed + 1).choice(len(keys), size=min(show, len(keys)), replace=False)
        out["examples"] = [
            {"layer": keys[i][0], "neuron": keys[i][1], "polarity": keys[i][2],
             **{name: {"description": texts[name][i][0], "summary": texts[name][i][1],
                       "sim": None if np.isnan(per_key[name][0][i]) else round(float(per_key[name][0][i]), 3),
                       "embedding_auc": None if np.isnan(per_key[name][1][i]) else round(float(per_key[name][1][i]), 3),
                       "embedding_span_auc": None if np.isnan(per_key[name][2][i]) else round(float(per_key[name][2][i]), 3)}
                for name in ("old", "new")}}
            for i in sorted(pick)]
    for key in ("sim_mean", "sim_median", "sim_mean_null_as_0", "auc_mean", "auc_median", "span_auc_median"):
        out[f"{key}_ratio_new_vs_old"] = round(out["new"][key] / out["old"][key], 3) if out["old"][key] else None
    return out


def _lookup_score(train, held, polarity: int, vocab: int) -> float | None:
    """Held-out Pearson r of a per-token lookup table fitted on the train windows (top and random):
    each token id predicts its mean signed train activation (unseen ids predict 0)."""
    from precompute.simulate import pearson

    ids = np.minimum(np.asarray(train.token_ids, np.int64).ravel(), vocab - 1)
    total = np.bincount(ids, weights=(polarity * train.acts).ravel(), minlength=vocab)
    count = np.bincount(ids, minlength=vocab)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return pearson(polarity * held.acts, mean[np.minimum(np.asarray(held.token_ids, np.int64), vocab - 1)])


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
    from precompute.pipeline import STAGES

    for name in STAGES:
        marker = build_root / f"{name}.done"
        if marker.exists():
            t = datetime.strptime(json.loads(marker.read_text())["finished"], "%Y-%m-%dT%H:%M:%SZ").timestamp()
            stages[name] = round(t - prev)
            prev = t
    corpus = json.loads((build_root / "corpus.done").read_text())
    return {"build_wall_s": round(end - start), "stage_s": stages,
            "corpus_tokens": int(corpus["n_sequences"]) * int(corpus["seq_len"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--db", default=None)
    p.add_argument("--batches", type=int, default=0, help="cut the pass after this many batches (0: the whole corpus)")
    p.add_argument("--bare-every", type=int, default=2, help="time a bare forward on every n-th batch")
    p.add_argument("--skip-458k", action="store_true")
    p.add_argument("--skip-collect", action="store_true", help="leave out the collection pass (minutes)")
    p.add_argument("--build-dir", default=None, help="build folder to read markers and exemplars from")
    p.add_argument("--sample", type=int, default=2000, help="(neuron, polarity) keys for the explainer comparison")
    p.add_argument("--show", type=int, default=0,
                   help="also print this many keys drawn at random (seeded) with both explainers' descriptions and scores")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from cache.paths import db_path
    from engine.loader import data_dir, model_slug

    out = {"model": args.model, "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    if not args.skip_collect:
        out.update(collect_ratio(args.model, args.batches, bare_every=args.bare_every))
    out["forward"] = forward_precision(args.model)
    db = Path(args.db) if args.db else db_path(args.model)
    root = Path(args.build_dir) if args.build_dir else data_dir() / "build" / model_slug(args.model)
    if db.exists():
        out.update(search_db(db))
        out["embed"] = embed_rates(db)
    wall = build_wall(root)
    if wall:
        out.update(wall)
    if (root / "merged.parquet").exists():
        out["explainers"] = explainers(root, args.model, args.sample, show=args.show)
    if not args.skip_458k:
        from benchmarks.search import bench_search

        res = bench_search()
        out.update({k: v for k, v in res.items() if k in ("search_ms_458k", "search_vs_numpy", "numpy_ms_458k", "sql_ms_458k")})
    out["loadavg_end"] = os.getloadavg()
    out["targets"] = {"collect_ratio": 0.85, "search_ms_458k": 150, "explainers.new.auc_median": 0.75,
                      "explainers.sim_mean_ratio_new_vs_old": 1.5, "corpus_tokens": 4 * 128_000, "build_wall_s": 900}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
