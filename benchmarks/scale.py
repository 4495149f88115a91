"""Benchmark: the whole product at Llama-3.1-8B's neuron count, on this CPU; prints JSON.

    python -m benchmarks.scale --json                      # both shapes, 256 windows of 32 tokens
    python -m benchmarks.scale --shapes embedded-neurons --n-sequences 64 --json   # a quick run

For each shape of the synthetic family (:mod:`engine.synth`: random weights, hidden size 256,
the embedded model's tokenizer), ``embedded-neurons`` (30 × 1,536 = 46,080 neurons, the
baseline measured in the same run) and ``llama-3.1-8b-neurons`` (32 × 14,336 = 458,752):

* ``build``: ``python -m precompute build`` on a small corpus (``--n-sequences`` windows of
  ``--seq-len`` tokens), run as a child process under ``/usr/bin/time -v``: ``stage_s`` (seconds
  per stage, from the stages' marker files' modification times: each stage's marker minus the
  previous one's, the first from the build folder's ``started`` file), ``wall_s``,
  ``peak_rss_mb`` (the child's maximum resident set size; without ``/usr/bin/time``,
  ``getrusage(RUSAGE_CHILDREN)``), ``db_mb`` (the database file), ``n_distinct_summaries``
  (how many different summary texts the embeddings stage embedded, of ``n_descriptions``);
* ``search_ms``: :meth:`cache.db.NeuronDB.semantic_search` with k = 500, the median over
  ``--queries`` queries after a warm-up, the query already embedded (``embed_ms``: embedding one
  query, median); ``search_rows``: how many embeddings it ranked (the described polarities: with
  ``--layers``, only those layers' — ``benchmarks.search`` times a full 458,752 × 384 table);
* ``neuron_page_ms``: the neuron page (``dashboard/pages/neuron.py``) run through Streamlit's
  ``AppTest`` with ``MONITOR_MODEL``/``MONITOR_DB`` set to the shape, median over
  ``--pages`` neurons after a warm-up page (which loads the model, the database and its view);
* ``trace_s``: :func:`engine.trace.run_trace` with log-prob attribution to the last token of a
  chat rendered to ``--chat-tokens`` tokens (median of ``--repeats``); ``trace_session_mb``:
  :func:`session_bytes` of that Trace, what one dashboard session keeps per memoised trace;
* ``steering``: 500 neurons (the "Bible verses:suppress:500" selection in the shape's database,
  or 500 random ones if it selects fewer) suppressed on the last user turn, greedy
  ``--gen-tokens``-token generations timed alternately with unsteered ones
  (:func:`benchmarks.steering.time_generation`); ``ratio`` = steered / unsteered median.

``growth`` divides each figure of the largest shape by the smallest's. ``goals`` are issue 12's
targets at 459k neurons on 2 cores. Every build and measurement runs in its own child process
(a shape's memory is returned before the next), in ``--work-dir`` (default
``data/scale/``, under ``MONITOR_DATA_DIR`` when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHAPE_ORDER = ("embedded-neurons", "llama-3.1-8b-neurons")
GOALS = {"search_ms": 150, "neuron_page_ms": 1000, "trace_session_mb": 200, "build_peak_rss_mb": 8192}
STEER_SPEC = "Bible verses:suppress:500"
QUERIES = ("Bible verses", "dates", "version numbers", "decimal numbers", "Python code", "never active",
           "the word the", "punctuation", "names of people", "numbers at the window start", "chat", "newlines")
CHAT_TEXT = ("The river bends twice before it reaches the old mill, where the water slows and the herons wait. "
             "Which is bigger: 9.8 or 9.11? Explain the reasoning step by step, and say why decimals confuse people. ")


# ----------------------------------------------------------------------------------- helpers
def session_bytes(obj) -> int:
    """Bytes of the torch tensors and numpy arrays reachable from ``obj``'s attributes: each
    attribute, and one level of containers (list, tuple, dict values, set) or objects (their
    attributes) below it. Each storage counts once (views of one tensor are not counted twice).
    It reads whatever attributes the object has, so it keeps measuring a Trace whose storage
    changes form (e.g. compact codes instead of float32 tensors)."""
    import numpy as np
    import torch

    seen: set = set()

    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            key = ("t", x.untyped_storage().data_ptr()) if x.numel() else ("id", id(x))
            if key in seen:
                return 0
            seen.add(key)
            return x.untyped_storage().nbytes()
        if isinstance(x, np.ndarray):
            base = x if x.base is None else x.base
            if id(base) in seen:
                return 0
            seen.add(id(base))
            return base.nbytes if isinstance(base, np.ndarray) else x.nbytes
        return 0

    def children(x) -> list:
        if isinstance(x, dict):
            return list(x.values())
        if isinstance(x, (list, tuple, set, frozenset)):
            return list(x)
        if hasattr(x, "__dict__") and not isinstance(x, type):
            return list(vars(x).values())
        if hasattr(x, "__slots__"):
            return [getattr(x, s) for s in x.__slots__ if hasattr(x, s)]
        return []

    total = 0
    for value in children(obj):
        total += size(value)
        for inner in children(value):
            total += size(inner)
    return total


def chat_of_tokens(tokenizer, n_tokens: int) -> list[dict]:
    """A one-message chat whose rendered prompt (chat template, generation prompt) has
    ``n_tokens`` tokens (or the nearest below, if a word boundary forbids exactly)."""
    from engine.chat import render_chat

    text = CHAT_TEXT * (n_tokens // 20 + 2)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lo, hi = 1, len(ids)
    while lo < hi:  # the longest prefix whose rendering fits
        mid = (lo + hi + 1) // 2
        chat = [{"role": "user", "content": tokenizer.decode(ids[:mid])}]
        if len(render_chat(tokenizer, chat)) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": tokenizer.decode(ids[:lo])}]


def _median_s(fn, repeats: int) -> float:
    """:func:`benchmarks.trace.median_time` without its warm-up (a trace at 459k takes a minute here)."""
    from benchmarks.trace import median_time

    return median_time(fn, repeats, warm_up=False)


def _stage_seconds(root: Path) -> dict:
    from precompute.pipeline import STAGES

    prev = (root / "started").stat().st_mtime
    out = {}
    for stage in STAGES:
        marker = root / f"{stage}.done"
        if marker.exists():
            t = marker.stat().st_mtime
            out[stage] = round(t - prev, 1)
            prev = t
    return out


# ----------------------------------------------------------------------------------- build
def build(shape: str, work: Path, n_sequences: int, seq_len: int, hidden: int, batch_size: int,
          reuse: bool = False, layers: str | None = None) -> dict:
    """Write the shape's model (not timed) and run the build as a child process (timed).
    ``reuse``: return the figures a previous run recorded for the same settings, if its database is there."""
    from engine.synth import shape as get_shape
    from engine.synth import write_model

    model = write_model(shape, work / "models" / f"{shape}-h{hidden}", hidden=hidden)
    root, db = work / f"build-{shape}", work / f"{shape}.duckdb"
    record = work / f"{shape}.build.json"
    settings = {"n_sequences": n_sequences, "seq_len": seq_len, "batch_size": batch_size, "hidden": hidden,
                "layers": layers}
    if reuse and record.exists() and db.exists():
        info = json.loads(record.read_text())
        if info.get("settings") == settings:
            return {**info, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    db.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "precompute", "build", "--model", str(model), "--n-sequences", str(n_sequences),
           "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--work-dir", str(root), "--db", str(db), "--quiet"]
    if layers:
        cmd += ["--layers", layers]
    timed = Path("/usr/bin/time").exists()
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    import resource

    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"the {shape} build failed ({res.returncode}): {res.stderr[-2000:]}")
    if timed:
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
        how = "/usr/bin/time -v"
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        how = "getrusage(RUSAGE_CHILDREN)"
    emb = json.loads((root / "embeddings.done").read_text())
    info = {
        "settings": settings, "model": str(model), "db": str(db), "n_neurons": get_shape(shape).n_neurons,
        "n_sequences": n_sequences, "seq_len": seq_len, "described_layers": layers or "all",
        "n_polarities_described": emb.get("n"),
        "wall_s": round(wall, 1), "stage_s": _stage_seconds(root), "peak_rss_mb": round(peak_kb / 1024),
        "peak_rss_from": how, "db_mb": round(db.stat().st_size / 2**20, 1),
        "n_descriptions": emb.get("n"), "n_distinct_summaries": emb.get("n_distinct"),
    }
    record.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------- measure
def measure(model: str, db_path: str, queries: int, pages: int, chat_tokens: int, repeats: int,
            gen_tokens: int) -> dict:
    """Search, the neuron page, a trace with attribution and steering, in this process."""
    import numpy as np

    from benchmarks.steering import time_generation
    from cache.db import open_database
    from concepts.resolve import select_all
    from engine.loader import load_model
    from engine.specs import ConceptSpec, union
    from engine.steering import Intervention, TokenRange
    from engine.trace import run_trace

    out: dict = {}

    def phase(name: str) -> None:  # progress on stderr, with the figures so far: a long or killed run keeps them
        print(f"[benchmarks.scale {time.strftime('%H:%M:%S')}] {name}; so far {json.dumps(out)}", file=sys.stderr,
              flush=True)

    db = None if db_path == "-" else open_database(db_path)
    if db is not None:
        out.update(search_and_page(db, db_path, model, queries, pages, phase))
    phase("trace")
    lm = load_model(model)
    chat = chat_of_tokens(lm.tokenizer, chat_tokens)
    traces = []

    def one_trace():
        traces.append(run_trace(lm, chat, target_index=-1))

    one_trace()  # warm-up
    out["trace_s"] = round(_median_s(one_trace, repeats), 3)
    trace = traces[-1]
    traces.clear()
    out["trace_tokens"] = len(trace.tokens)
    out["trace_session_mb"] = round(session_bytes(trace) / 2**20, 1)
    del trace

    phase("steering")
    neurons, source = [], "random"
    if db is not None:
        sel = union(select_all(db, [ConceptSpec.parse(STEER_SPEC)]))
        neurons = sorted({(l, n, p) for iv in sel.interventions for l, n, p in iv.neurons})
        source = STEER_SPEC
    if len({(l, n) for l, n, _ in neurons}) < 500:
        rng = np.random.default_rng(0)
        flat = rng.choice(lm.n_layers * lm.n_neurons, size=500, replace=False)
        neurons, source = [(int(i // lm.n_neurons), int(i % lm.n_neurons), 1) for i in sorted(flat)], "random"
    steered = [Intervention(neurons, "replace", 0.0, tokens=TokenRange("last_user"))]
    gen = time_generation(lm, {"unsteered": (None, gen_tokens), "steered": (steered, gen_tokens)}, repeats)
    out["steering"] = {"neurons": len({(l, n) for l, n, _ in neurons}), "neurons_source": source,
                       "tokens": gen_tokens, **gen,
                       "ratio": round(gen["steered"]["median_s"] / gen["unsteered"]["median_s"], 3)}
    if db is not None:
        db.close()
    return out


def search_and_page(db, db_path: str, model: str, queries: int, pages: int, phase) -> dict:
    """``embed_ms``, ``search_ms`` (top 500), ``search_rows`` and ``neuron_page_ms`` on ``db``."""
    from cache.embedder import embed

    phase("search")
    out: dict = {}
    qs = [embed([q])[0] for q in QUERIES[: max(queries, 1)]]
    out["embed_ms"] = round(_median_s(lambda: embed(["Bible verses"]), 5) * 1e3, 1)
    db.semantic_search(qs[0], k=500)  # warm-up: loads the vector index
    times = []
    for q in qs:
        t0 = time.perf_counter()
        hits = db.semantic_search(q, k=500)
        times.append(time.perf_counter() - t0)
    out["search_ms"] = round(statistics.median(times) * 1e3, 1)
    out["search_rows"] = db.counts()["embeddings"]  # what the search ranked: the described polarities
    out["search_hits"] = len(hits)

    phase("neuron page")
    described = json.loads(db.meta.get("described_layers") or "null") or list(range(db.n_layers))
    out["neuron_page_ms"] = neuron_page_ms(model, db_path, described, db.n_neurons, pages)
    return out


def neuron_page_ms(model: str, db_path: str, layers: list[int], n_neurons: int, pages: int) -> float:
    """Median ms of the neuron page through AppTest, over ``pages`` random neurons of the described
    ``layers`` after a warm-up one."""
    import logging

    import numpy as np
    from streamlit.testing.v1 import AppTest

    for name in ("streamlit", "streamlit.runtime.scriptrunner_utils.script_run_context",
                 "streamlit.runtime.caching.cache_data_api"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["MONITOR_MODEL"] = model
    os.environ["MONITOR_DB"] = db_path
    rng = np.random.default_rng(1)
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=900).run()
    at.switch_page("pages/neuron.py")
    times = []
    for i in range(pages + 1):
        at.query_params = {"layer": str(int(rng.choice(layers))), "neuron": str(int(rng.integers(n_neurons)))}
        t0 = time.perf_counter()
        at.run()
        dt = time.perf_counter() - t0
        if at.exception or at.error:
            raise SystemExit(f"the neuron page failed: {(at.exception or at.error)[0].value}")
        if i:  # the first page is the warm-up
            times.append(dt)
    return round(statistics.median(times) * 1e3, 1)


# ----------------------------------------------------------------------------------- driver
def _child(args, shape: str, info: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--measure", info["model"], info["db"],
           "--queries", str(args.queries), "--pages", str(args.pages), "--chat-tokens", str(args.chat_tokens),
           "--repeats", str(args.repeats), "--gen-tokens", str(args.gen_tokens)]
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # its stderr (progress) passes through
    if res.returncode != 0:
        raise SystemExit(f"measuring {shape} failed ({res.returncode}); its errors are above.")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPE_ORDER), help="comma-separated shapes of engine.synth")
    p.add_argument("--n-sequences", type=int, default=256, help="corpus windows of each build")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", default=None,
                   help="describe, score and embed only these layers (precompute's --layers, e.g. 15); default all")
    p.add_argument("--hidden", type=int, default=256, help="the synthetic models' residual width")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--pages", type=int, default=3)
    p.add_argument("--chat-tokens", type=int, default=200)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=None, help="models, build folders and databases (default data/scale)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a shape's database (and its recorded build figures) from an earlier run with the same settings")
    p.add_argument("--measure", nargs=2, metavar=("MODEL", "DB"),
                   help="measure one model and database in this process (DB '-': no database, so only the trace "
                        "and steering with 500 random neurons); what the driver runs per shape")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, args.queries, args.pages, args.chat_tokens, args.repeats,
                                 args.gen_tokens)))
        return 0
    from engine.loader import data_dir
    from engine.synth import SHAPES

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        raise SystemExit(f"--shapes: use some of {', '.join(SHAPES)}")
    shapes.sort(key=lambda s: SHAPES[s].n_neurons)
    work = Path(args.work_dir) if args.work_dir else data_dir() / "scale"
    work.mkdir(parents=True, exist_ok=True)
    out = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "hidden": args.hidden,
           "chat_tokens": args.chat_tokens, "neuron_page_timed_with": "streamlit AppTest (dashboard/pages/neuron.py)",
           "goals_at_459k": GOALS, "shapes": {}}
    for shape in shapes:
        info = build(shape, work, args.n_sequences, args.seq_len, args.hidden, args.batch_size, args.reuse, args.layers)
        out["shapes"][shape] = {"build": info, **_child(args, shape, info)}
    if len(shapes) > 1:
        small, big = (_flat(out["shapes"][s]) for s in (shapes[0], shapes[-1]))
        out["growth"] = {k: round(big[k] / small[k], 2) for k in big if k in small and small[k]}
        top = out["shapes"][shapes[-1]]
        got = {"search_ms": top["search_ms"], "neuron_page_ms": top["neuron_page_ms"],
               "trace_session_mb": top["trace_session_mb"], "build_peak_rss_mb": top["build"]["peak_rss_mb"]}
        out["meets_goals"] = {k: got[k] <= GOALS[k] for k in GOALS} if SHAPES[shapes[-1]].n_neurons > 400_000 else None
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
