"""The precompute pipeline: exactness against brute force, sharding, kill-and-resume, search quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from engine.errors import MonitorError
from engine.hooks import NeuronHooks
from precompute.collect import QUANTILE_LEVELS, Collector, extremes_needed
from precompute.pipeline import STAGES, Build, BuildConfig

from .conftest import ROOT

TABLES = ("neurons", "sequences", "descriptions", "embeddings", "exemplars", "quantiles", "scores")
ORDER = {
    "neurons": "layer, neuron", "sequences": "seq_id", "descriptions": "layer, neuron, polarity",
    "embeddings": "layer, neuron, polarity", "exemplars": "layer, neuron, polarity, split, rank",
    "quantiles": "layer, neuron, q",
    "scores": "layer, neuron, polarity, scorer",
}


def tiny_args(model_dir: Path, root: Path) -> list[str]:
    return ["--model", str(model_dir), "--profile", "tiny", "--n-sequences", "48", "--batch-size", "8",
            "--checkpoint-every", "1", "--embed-chunk", "100", "--precision", "fp32", "--work-dir", str(root / "build"), "--db", str(root / "db.duckdb"),
            "--quiet"]  # fp32: the brute-force checks are exact; the same embedding chunks: bf16 vectors depend on batching


def run_cli(*args, env_extra=None, check=True):
    env = {**os.environ, **(env_extra or {})}
    res = subprocess.run([sys.executable, "-m", "precompute", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}: {res.stderr[-2000:]}")
    return res


def db_tables(path: Path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY {ORDER[t]}").df() for t in TABLES}
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    finally:
        con.close()
    meta.pop("build_time")
    out["meta"] = pd.DataFrame(sorted(meta.items()), columns=["key", "value"])
    return out


def assert_same_db(a: Path, b: Path) -> None:
    ta, tb = db_tables(a), db_tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True, obj=name)


def assert_one_score_row_per_key(path: Path) -> None:
    con = duckdb.connect(str(path), read_only=True)
    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        n_keys = con.execute("SELECT count(*) FROM descriptions").fetchone()[0]
        per_scorer = dict(con.execute("SELECT scorer, count(*) FROM scores GROUP BY scorer").fetchall())
        dupes = con.execute("SELECT count(*) FROM (SELECT layer, neuron, polarity, scorer FROM scores "
                            "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        missing = con.execute("SELECT count(*) FROM descriptions d CROSS JOIN (SELECT DISTINCT scorer FROM scores) s "
                              "ANTI JOIN scores x ON x.layer = d.layer AND x.neuron = d.neuron "
                              "AND x.polarity = d.polarity AND x.scorer = s.scorer").fetchone()[0]
        main = con.execute("SELECT count(*) FROM descriptions d JOIN scores x USING (layer, neuron, polarity) "
                           "WHERE x.scorer = d.score_scorer AND x.value IS NOT DISTINCT FROM d.score").fetchone()[0]
        # the simulation's "no prediction" (a constant simulated activation) must be NULL; an
        # embedding AUC of exactly 0 is a real measurement (every held-out window ranked below
        # every random one), seen on the few windows of the scale test's build
        zeros = con.execute("SELECT count(*) FROM scores WHERE value = 0 "
                            "AND scorer LIKE 'offline-token-match%'").fetchone()[0]
    finally:
        con.close()
    names = [d["name"] for d in json.loads(meta["scorers"])]
    assert sorted(per_scorer) == sorted(names) == sorted(["offline-token-match-v2", "embedding-auc-v1", "embedding-span-auc-v1"])
    assert all(c == n_keys for c in per_scorer.values()) and dupes == 0 and missing == 0
    assert main == con_count_scored(path)  # each description's main score is its row in scores
    assert zeros == 0  # "no prediction" is NULL, never a stored 0


def con_count_scored(path: Path) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM descriptions WHERE score_scorer IS NOT NULL").fetchone()[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    """An uninterrupted build of the tiny model, every stage in one process (``--one-process``):
    the builds that run each stage in a child process of its own must equal it."""
    root = tmp_path_factory.mktemp("ref")
    run_cli("build", *tiny_args(tiny_llama_dir, root), "--one-process")
    return root


def test_kill_in_every_stage_then_resume_gives_same_database(tmp_path, tiny_llama_dir, reference):
    """SIGKILL the build inside each stage in turn; each re-run resumes; the result is identical."""
    args = tiny_args(tiny_llama_dir, tmp_path)
    kills = ["corpus:1", "activations:2", "activations:4", "exemplars:1", "descriptions:1", "embeddings:1", "scores:2", "write:1"]
    for spec in kills:
        res = run_cli("build", *args, env_extra={"PRECOMPUTE_KILL_AT": spec}, check=False)
        assert res.returncode == -9, f"{spec}: expected SIGKILL, got {res.returncode}: {res.stderr[-500:]}"
    status = run_cli("status", *args).stdout
    assert "write         missing" in status and "corpus        done" in status
    assert not (tmp_path / "db.duckdb").exists()  # a killed write leaves no half database behind
    run_cli("build", *args)
    assert_same_db(tmp_path / "db.duckdb", reference / "db.duckdb")
    for db in (tmp_path / "db.duckdb", reference / "db.duckdb"):  # one score row per (neuron, polarity, scorer)
        assert_one_score_row_per_key(db)
    # Re-running a finished build does nothing and changes nothing.
    before = (tmp_path / "db.duckdb").stat().st_mtime_ns
    run_cli("build", *args)
    assert (tmp_path / "db.duckdb").stat().st_mtime_ns == before


def test_each_stage_runs_in_its_own_process_and_dies_with_the_build(tmp_path, tiny_llama_dir, reference):
    """The default build runs every stage in a child process (so one stage's memory never adds to
    the next one's peak); SIGKILL of the build takes the running stage with it, and a re-run resumes."""
    import signal
    import time

    from precompute.pipeline import process_tree

    from .test_background import _pid_alive as _alive

    args = tiny_args(tiny_llama_dir, tmp_path)
    hold = tmp_path / "hold"
    hold.write_text("held")
    env = {**os.environ, "PRECOMPUTE_HOLD_AT": "descriptions:1", "PRECOMPUTE_HOLD_FILE": str(hold)}
    build = subprocess.Popen([sys.executable, "-m", "precompute", "build", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    work = tmp_path / "build"
    try:
        deadline = time.time() + 300
        while not (work / "descriptions" / "layer-000.parquet").exists():  # held right after its first layer
            assert build.poll() is None, build.stderr.read().decode()[-1000:]
            assert time.time() < deadline, "the build never reached the descriptions stage"
            time.sleep(0.2)
        pids = {stage: json.loads((work / f"{stage}.done").read_text())["pid"] for stage in ("corpus", "activations", "exemplars")}
        assert len(set(pids.values())) == 3 and build.pid not in pids.values(), pids  # one process per stage
        for stage in pids:  # each measured its own peak, reset when it began
            assert json.loads((work / f"{stage}.done").read_text())["peak_rss_mb"] > 0
        tree = process_tree(build.pid)
        held = [p for p in tree[1:] if p not in pids.values()]
        assert len(held) >= 1, tree  # the descriptions stage's process below the build
        build.send_signal(signal.SIGKILL)
        build.wait(timeout=30)
        deadline = time.time() + 20
        while any(_alive(p) for p in held) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in held if _alive(p)], "a stage's process outlived the killed build"
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
    assert not (work / "descriptions.done").exists()
    hold.unlink()
    run_cli("build", *args)  # resumes from the descriptions stage
    assert_same_db(tmp_path / "db.duckdb", reference / "db.duckdb")


def test_a_stage_error_is_one_line_from_its_process(tmp_path, tiny_llama_dir):
    """A stage that fails in its child process reports the same one-line error as in one process."""
    args = tiny_args(tiny_llama_dir, tmp_path)
    run_cli("build", *args, "--until", "corpus")
    (tmp_path / "build" / "corpus.parquet").write_bytes(b"not parquet")  # the activations stage reads it
    for extra in ([], ["--one-process"]):
        res = run_cli("build", *args, *extra, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "is not a corpus file" in res.stderr, res.stderr


def test_two_processes_equal_one(tmp_path, tiny_llama_dir, reference):
    """Shards run by two concurrent processes merge into exactly the single-process database."""
    args = tiny_args(tiny_llama_dir, tmp_path)
    run_cli("build", *args, "--until", "corpus")
    procs = [subprocess.Popen([sys.executable, "-m", "precompute", "activations", *args, "--shard", str(i), "--num-shards", "2"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-1000:]
    assert sorted(x.name for x in (tmp_path / "build" / "shards" / "2").glob("shard-?.parquet")) == ["shard-0.parquet", "shard-1.parquet"]
    run_cli("merge", *args)
    assert_same_db(tmp_path / "db.duckdb", reference / "db.duckdb")


def test_exemplars_and_quantiles_match_brute_force(reference, tiny_llama_dir, tiny_lm):
    """Recompute every activation of the corpus at once and rank/quantile it with NumPy."""
    cfg = BuildConfig(model=str(tiny_llama_dir), profile="tiny", n_sequences=48, batch_size=8, work_dir=str(reference / "build"))
    corpus = Build(cfg, progress=False).corpus
    ids = torch.from_numpy(corpus.token_ids.astype(np.int64))
    with torch.inference_mode(), NeuronHooks(tiny_lm, capture=True) as hooks:
        tiny_lm.model.model(input_ids=ids)
        acts = torch.cat(hooks.captured, dim=-1).numpy()  # [n_seq, T, F]
    body = acts[:, 1:, :].astype(np.float64)  # the attention-sink token is skipped
    n_neurons = tiny_lm.n_neurons
    con = duckdb.connect(str(reference / "db.duckdb"), read_only=True)
    ex = con.execute("SELECT layer, neuron, polarity, rank, seq_id, max_act FROM exemplars WHERE polarity != 0").df()
    qs = con.execute("SELECT layer, neuron, q, value FROM quantiles").df()
    con.close()
    seq = np.arange(len(corpus))
    for pol in (1, -1):
        best = (pol * body).max(axis=1)  # [n_seq, F]
        for f in range(acts.shape[2]):
            order = np.lexsort((seq, -best[:, f]))[:20]  # value descending, then sequence id ascending
            got = ex[(ex.layer == f // n_neurons) & (ex.neuron == f % n_neurons) & (ex.polarity == pol)].sort_values("rank")
            assert got.seq_id.tolist() == order.tolist(), (pol, f)
            np.testing.assert_allclose(got.max_act.values, pol * best[order, f], rtol=1e-5, atol=1e-6)
    flat = body.reshape(-1, body.shape[2])
    for q in QUANTILE_LEVELS:
        ref = np.quantile(flat, q, axis=0)  # numpy's linear interpolation
        got = qs[qs.q == q].sort_values(["layer", "neuron"]).value.values
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_collector_merge_is_exact_with_ties():
    """Two halves merged equal one pass, even with an exact tie between two sequences."""
    torch.manual_seed(0)
    f, t, b = 50, 12, 4
    data = torch.randn(32, t, f) * torch.rand(1, 1, f) * 3
    data[9] = data[5]
    one = Collector(f, t, 6, 30, random_ids=[2, 17], pool_limit=300)
    halves = [Collector(f, t, 6, 30, random_ids=[2, 17], pool_limit=300) for _ in range(2)]
    for i in range(8):
        x, ids = data[i * b : (i + 1) * b], torch.arange(i * b, (i + 1) * b)
        one.update(ids, x.transpose(1, 2))  # feature-major [b, F, T]
        halves[i % 2].update(ids, x.transpose(1, 2))
    halves[0].merge(halves[1])
    one.flush()
    for name in ("top_vals", "top_ids", "top_acts", "ext", "random_acts"):
        assert torch.equal(getattr(one.state, name), getattr(halves[0].state, name)), name
    tied = one.state.top_ids[0]
    both = (tied == 5).any(1) & (tied == 9).any(1)
    assert both.any()  # the tie is inside some top list, with 5 (smaller id) ranked first
    for row in torch.nonzero(both).flatten():
        r = tied[row].tolist()
        assert r.index(5) + 1 == r.index(9)


def test_collector_in_blocks_equals_whole(monkeypatch, tmp_path):
    """Folding, sorting, merging, saving and loading a block of features (or rows) at a time give
    exactly the state of whole-tensor steps; a file saved in one row group (the earlier format)
    loads the same; ``ext=False`` skips only the extremes."""
    import pyarrow.parquet as pq

    import precompute.collect as collect

    torch.manual_seed(1)
    n_layers, n, t, b = 3, 17, 9, 4
    data = torch.randn(40, t, n_layers * n) * torch.rand(1, 1, n_layers * n) * 3
    data[13] = data[6]  # a tie

    def run(feature_block: int, halves: bool = False) -> Collector:
        monkeypatch.setattr(collect, "FEATURE_BLOCK", feature_block)
        cols = [Collector(n_layers * n, t, 5, 25, random_ids=[3, 21, 30], pool_limit=200) for _ in range(2 if halves else 1)]
        for i in range(10):
            x = data[i * b : (i + 1) * b]
            cols[i % len(cols)].update_layers(torch.arange(i * b, (i + 1) * b), list(x.split(n, dim=2)))
        if halves:
            cols[0].merge(cols[1])
        cols[0].flush()
        return cols[0]

    whole = run(10_000)
    names = ("top_vals", "top_ids", "top_acts", "ext", "random_acts", "random_seen", "n_tokens")
    for got in (run(7), run(7, halves=True), run(10_000, halves=True)):
        for name in names:
            assert torch.equal(getattr(whole.state, name), getattr(got.state, name)), name
    # bf16 activations (the autocast pass) folded from a bf16 buffer equal their float32 copy folded
    monkeypatch.setattr(collect, "FEATURE_BLOCK", 7)
    half, full = (Collector(n_layers * n, t, 5, 25, random_ids=[3, 21, 30], pool_limit=200) for _ in range(2))
    for i in range(10):
        x = data[i * b : (i + 1) * b].to(torch.bfloat16)
        half.update_layers(torch.arange(i * b, (i + 1) * b), list(x.split(n, dim=2)))
        full.update(torch.arange(i * b, (i + 1) * b), x.float().transpose(1, 2))
    half.flush()
    full.flush()
    for name in names:
        assert torch.equal(getattr(half.state, name), getattr(full.state, name)), name
    whole.save(tmp_path / "one.parquet")  # small enough for one row group, as every file was before
    monkeypatch.setattr(collect, "IO_BLOCK_BYTES", 1000)  # 2 features, 1 random sequence a block
    whole.save(tmp_path / "blocks.parquet", {"shard": 0})
    assert pq.ParquetFile(tmp_path / "one.parquet").num_row_groups == 1
    assert pq.ParquetFile(tmp_path / "blocks.parquet").num_row_groups > 5
    assert pq.ParquetFile(tmp_path / "blocks.parquet.random").num_row_groups == 3
    for path in ("one.parquet", "blocks.parquet"):
        got = Collector.load(tmp_path / path)
        for name in names + ("next_batch",):
            assert torch.equal(getattr(whole.state, name), getattr(got.state, name)), (path, name)
        assert got.quantiles().keys() == whole.quantiles().keys()
    lean = Collector.load(tmp_path / "blocks.parquet", ext=False)
    assert lean.state.ext.numel() == 0 and torch.equal(lean.state.top_acts, whole.state.top_acts)
    assert Collector.read_info(tmp_path / "blocks.parquet")["shard"] == 0


def test_collector_matches_brute_force_on_shuffled_batches():
    """Top lists (ids, values and the stored per-token rows) and quantiles against NumPy,
    with exact ties, repeated sequences and ids arriving out of order."""
    rng = np.random.default_rng(3)
    n, t, f, k, b = 120, 10, 40, 7, 9
    data = (rng.standard_normal((n, t, f)) * rng.uniform(0.1, 3, f)).astype(np.float32)
    data[50] = data[7]  # exact tie between two sequences in every feature
    data[90, :, :5] = data[3, :, :5]
    n_tok = n * (t - 1)
    c = Collector(f, t, k, extremes_needed(n_tok), random_ids=[4, 77], pool_limit=500)
    order = rng.permutation(n)
    for i in range(0, n, b):
        ids = np.sort(order[i : i + b]) if i % 2 else order[i : i + b]  # some batches unsorted
        c.update(torch.from_numpy(ids), torch.from_numpy(data[ids]).transpose(1, 2))
    c.flush()
    s = c.state
    body = data[:, 1:, :].astype(np.float64)
    seq = np.arange(n)
    for p, sign in ((0, 1.0), (1, -1.0)):
        best = (sign * body).max(axis=1)  # [n, F]
        for j in range(f):
            ref = np.lexsort((seq, -best[:, j]))[:k]
            assert s.top_ids[p, j].tolist() == ref.tolist(), (p, j)
            np.testing.assert_allclose(s.top_vals[p, j].numpy(), best[ref, j], rtol=1e-6)
            np.testing.assert_array_equal(s.top_acts[p, j].numpy(), data[ref, :, j].astype(np.float16))
    for q, got in c.quantiles().items():
        np.testing.assert_allclose(got.numpy(), np.quantile(body.reshape(-1, f), q, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.random_acts.numpy(), data[[4, 77]].astype(np.float16))


def test_quantiles_need_enough_extremes():
    """28 token values, 4 extremes kept per end: q=0.1 reads order statistic 2.7 (fine), q=0.2 reads 5.4 (not kept)."""
    c = Collector(3, 8, 2, 4, random_ids=[])
    x = torch.randn(4, 8, 3)
    c.update(torch.arange(4), x.transpose(1, 2))
    got = c.quantiles((0.1,))[0.1]
    ref = np.quantile(x[:, 1:].reshape(-1, 3).numpy().astype(np.float64), 0.1, axis=0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="extremes"):
        c.quantiles((0.2,))


def test_semantic_search_matches_hand_computed_cosine(embedded_db):
    from cache.db import open_database
    from cache.embedder import embed

    db = open_database(embedded_db)
    q = embed(["dates in a calendar"])[0]
    con = duckdb.connect(str(embedded_db), read_only=True)
    rows = con.execute("SELECT layer, neuron, polarity, vec FROM embeddings").df()
    con.close()
    mat = np.stack(rows.vec.values).astype(np.float64)
    sims = mat @ q.astype(np.float64) / np.linalg.norm(mat, axis=1)
    top = np.argsort(-sims, kind="stable")[:25]
    got = db.semantic_search(q, k=25)
    assert list(zip(got.layer, got.neuron, got.polarity)) == [tuple(rows.iloc[i][["layer", "neuron", "polarity"]]) for i in top]
    np.testing.assert_allclose(got.similarity.values, sims[top], atol=1e-5)


def test_bible_query_finds_bible_neurons(embedded_db):
    """'Bible verses' returns neurons whose top exemplars are mostly Bible text (vs ~13% of the corpus)."""
    from cache.db import open_database
    from cache.embedder import embed

    db = open_database(embedded_db)
    hits = db.semantic_search(embed(["Bible verses"])[0], k=20)
    con = duckdb.connect(str(embedded_db), read_only=True)
    shares = []
    base = con.execute("SELECT avg((source = 'bible')::INT) FROM sequences").fetchone()[0]
    for h in hits.itertuples():
        src = con.execute(
            "SELECT s.source FROM exemplars e JOIN sequences s USING (seq_id) "
            "WHERE e.layer = ? AND e.neuron = ? AND e.polarity = ? AND e.split = 'train'",
            [h.layer, h.neuron, h.polarity],
        ).df().source
        shares.append((src == "bible").mean())
    con.close()
    assert np.mean(shares) >= 0.5, shares
    assert np.mean(shares) > 3 * base
    assert hits.top_exemplar.notna().all()


def test_database_meta_says_what_built_it(embedded_db):
    con = duckdb.connect(str(embedded_db), read_only=True)
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("descriptions", "quantiles", "neurons")}
    summaries = con.execute("SELECT summary FROM descriptions").df().summary
    con.close()
    assert meta["explainer"] == "offline-v3" and meta["scorer"] == "offline-token-match-v2"
    assert meta["schema_version"] == "2"
    assert meta["model_slug"] == "smollm2-135m-instruct" and meta["n_layers"] == "30" and meta["n_neurons"] == "1536"
    assert json.loads(meta["described_layers"]) == [0, 8, 15, 22, 29]
    assert {s["name"] for s in json.loads(meta["corpus_sources"])} >= {"bible", "dates", "changelogs", "decimals", "code", "prose", "chat"}
    assert counts["descriptions"] == 5 * 1536 * 2 and counts["neurons"] == 5 * 1536
    assert counts["quantiles"] == 30 * 1536 * len(QUANTILE_LEVELS)
    assert summaries.str.split().str.len().max() < 30  # offline-v3: tokens, sources, two context words, 8 snippet words


def test_status_and_bad_options(tmp_path, tiny_llama_dir):
    args = tiny_args(tiny_llama_dir, tmp_path)
    out = run_cli("status", *args).stdout
    for stage in STAGES:
        assert f"{stage}" in out
    assert "database:" in out and "missing" in out
    for bad in (["--k", "0"], ["--layers", "0-99"], ["--profile", "tiny", "--files", str(tmp_path / "nope.txt")]):
        res = run_cli("build", *args, *bad, check=False)
        assert res.returncode == 2, (bad, res.stderr)
        lines = [l for l in res.stderr.strip().splitlines() if l.strip() and "it/s" not in l and "%|" not in l]
        assert len(lines) == 1 and lines[-1].startswith("error: "), res.stderr
    # A different setting on the same folder is refused with the way out.
    run_cli("build", *args, "--until", "corpus")
    res = run_cli("build", *args, "--seed", "3", check=False)
    assert res.returncode == 2 and "--fresh" in res.stderr


def test_missing_shard_merge_message(tmp_path, tiny_llama_dir):
    args = tiny_args(tiny_llama_dir, tmp_path)
    res = run_cli("merge", *args, check=False)
    assert res.returncode == 2 and "shards" in res.stderr


def test_build_refuses_unknown_model(tmp_path):
    b = Build(BuildConfig(model=str(tmp_path / "nowhere"), work_dir=str(tmp_path / "w")), progress=False)
    with pytest.raises(MonitorError, match="Unknown model"):
        b.run()


def test_bf16_activation_pass_is_within_tolerance_of_fp32(lm):
    """The build's bf16 autocast forward (used where the CPU has bf16 instructions) against fp32 on
    real corpus text. Tolerance, per neuron over 8 × 64 tokens (sink excluded): the sequence-max
    that ranks exemplars is within 5% of the neuron's fp32 range for 95% of neurons (median ≤ 1.5%),
    the activations correlate ≥ 0.99 for 95% of neurons, and each neuron's fp32 top sequence is
    among its bf16 top 2 for ≥ 90% of neurons."""
    from precompute.corpus import build_corpus

    corpus = build_corpus(lm.tokenizer, "tiny", progress=False)
    ids = torch.from_numpy(corpus.token_ids[:8].astype(np.int64))
    out = {}
    for bf16 in (False, True):
        with torch.inference_mode(), NeuronHooks(lm, capture=True) as hooks, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lm.model.model(input_ids=ids)
            out[bf16] = torch.cat([h.float() for h in hooks.captured], dim=-1)[:, 1:].numpy()  # [b, T−1, F]
    a, b = out[False], out[True]
    rng = a.max(axis=(0, 1)) - a.min(axis=(0, 1))  # [F]
    err = np.abs(b.max(axis=1) - a.max(axis=1)).max(axis=0) / np.maximum(rng, 1e-6)  # [F]
    assert np.median(err) <= 0.015 and np.quantile(err, 0.95) <= 0.05, (np.median(err), np.quantile(err, 0.95))
    x, y = a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2])
    x, y = x - x.mean(0), y - y.mean(0)
    r = (x * y).sum(0) / np.sqrt((x * x).sum(0) * (y * y).sum(0) + 1e-30)
    assert np.quantile(r, 0.05) >= 0.99, np.quantile(r, 0.05)
    top32 = a.max(axis=1).argmax(axis=0)  # [F]
    top2_16 = np.argsort(-b.max(axis=1), axis=0)[:2]  # [2, F]
    assert ((top2_16 == top32[None]).any(axis=0)).mean() >= 0.9


def test_bf16_linear_weights_give_identical_activations_and_unmap_the_checkpoint(tmp_path, lm):
    """The bf16 activation pass stores the Linear weights in bf16 once (``bf16_linear_weights``)
    instead of letting autocast cast them on every forward: the captured activations are
    bit-identical, and no tensor keeps the float32 checkpoint mapped any more."""
    import shutil

    from engine.loader import bf16_linear_weights, load_model

    folder = tmp_path / "model"
    shutil.copytree(lm.source, folder)  # its own file, so /proc/self/maps tells its mapping from the session model's
    fresh = load_model(str(folder))
    ids = torch.randint(0, fresh.tokenizer.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))

    def captured(model):
        with torch.inference_mode(), NeuronHooks(model, capture=True) as hooks, torch.autocast("cpu", dtype=torch.bfloat16):
            model.model.model(input_ids=ids)
            return [h.clone() for h in hooks.captured]

    def mapped() -> bool:
        return str(folder / "model.safetensors") in Path("/proc/self/maps").read_text()

    before = captured(fresh)
    assert mapped()
    bf16_linear_weights(fresh)
    assert fresh.layers[3].mlp.down_proj.weight.dtype == torch.bfloat16
    assert fresh.model.model.norm.weight.dtype == torch.float32
    if fresh.model.config.tie_word_embeddings:
        assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight
    after = captured(fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and before[0].dtype == torch.bfloat16
    assert not mapped()
