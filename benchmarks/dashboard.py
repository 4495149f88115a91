"""Benchmark: the dashboard's overhead over the engine, for one chat turn and for a display rerun.

``python -m benchmarks.dashboard --json`` prints one JSON object. Everything runs in this
process on the same model object (the app's ``st.cache_resource`` one), after a warm-up turn;
times are medians over ``--repeats`` fresh sessions, with the UI and raw measurements
interleaved so machine noise hits both alike.

What is timed:

* ``ui_turn_s``: submitting a chat message through ``streamlit.testing.v1.AppTest`` until the
  script run returns with every element rendered: the streamed reply (``--max-new-tokens``,
  greedy), the trace, the ranked neuron table joined with the database, the heatmap, the bar
  chart and the token chart.
* ``ui_generate_s``: the part of that spent inside ``engine.generate`` (timed by the app).
* ``ui_trace_part_s`` = ``ui_turn_s − ui_generate_s``: from the reply being done to the
  rendered trace (the engine trace plus everything the UI adds).
* ``raw_trace_s``: ``engine.trace.run_trace`` on the same conversation (prompt + reply), the
  same call the page makes. ``raw_generate_s``: ``engine.generate`` with the same settings.
* ``ui_overhead_ratio``: the median over turns of ``ui_trace_part_s / raw_trace_s``, where each
  turn's ``raw_trace_s`` is the mean of one raw trace just before and one just after it (target ≤ 1.5).
  ``ui_rendering_s`` = ``ui_trace_part_s`` minus the engine trace inside the app: what the UI adds.
* ``ui_turn_ratio`` = ``ui_turn_s / (raw_generate_s + raw_trace_s)``: the whole turn, reply included.
* With ``--no-panels`` the chat page's extension panels (:mod:`dashboard.panels`, e.g. the concept
  linter) are left out, which times the core page alone; ``chat_panels_drawn`` says which were on.
* ``rerun_ms``: a rerun after changing only a display widget (the activation threshold slider),
  which reuses the memoised trace (target ≤ 300 ms). ``rerun_inspect_ms``: choosing another
  neuron to colour the tokens by. ``rerun_attribution_objective_ms``: switching the attribution
  objective (logprob ↔ prob) once the attribution trace exists.

With ``--hosting`` it measures the hosting figures of issue 10 instead (each against its goal):

* ``bundle_mb``: ``python -m cache bundle`` of the database (``--db``), with ``bundle_source_mb``
  (the baseline) and ``bundle_overlap_min``, the least top-20 search overlap with the source.
* ``first_trace_no_db_s``: a fresh Python process with no database, from its start (imports and
  the model load included) to the first chat turn's trace rendered through AppTest. It leaves out
  ``make setup`` and the browser, so it is a lower bound of ``clone_to_first_trace_s``.
* ``app_rss_mb_3_sessions``: a fresh process serving three AppTest sessions (one turn each, the
  model and the bundle shared as under ``streamlit run``, ``MONITOR_HOSTED=1``): its peak resident
  memory (``VmHWM``; ``_now``: ``VmRSS`` at the end), with ``app_rss_mb_idle`` after the imports as the baseline.
* ``clone_to_first_trace_s``, ``clone_to_descriptions_s``, ``build_peak_rss_mb`` (and
  ``clone_to_full_db_s``) come from ``python -m benchmarks.clone`` (a fresh clone's ``make demo``
  in a real browser, with the background build): with ``--clone descriptions`` (about 5 minutes
  on 2 cores; the peak then covers the partial build) or ``--clone full`` (the whole build, about
  40 minutes) it runs here first, on an otherwise idle machine; without it they are null.
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # this process's start (after the standard library), for first_trace_no_db_s

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as dashboard/app.py sets it for the server; before torch loads

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

APP = ROOT / "dashboard" / "app.py"
PROMPT = "Which is bigger: 9.8 or 9.11?"


def _quiet_streamlit() -> None:
    import logging

    for name in ("streamlit", "streamlit.runtime.scriptrunner_utils.script_run_context",
                 "streamlit.runtime.caching.cache_data_api"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _session(max_new_tokens: int):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=900).run()
    _check(at)
    at.slider(key="w_max_new_tokens").set_value(max_new_tokens)
    at.slider(key="w_temperature").set_value(0.0).run()
    return at


def _check(at) -> None:
    if at.exception:
        raise SystemExit(f"the app raised: {at.exception[0].value}")
    if at.error:
        raise SystemExit(f"the app showed an error: {at.error[0].value}")


def _timed_run(at) -> float:
    t0 = time.perf_counter()
    at.run()
    dt = time.perf_counter() - t0
    _check(at)
    return dt


def run(repeats: int, max_new_tokens: int, rerun_repeats: int, with_panels: bool = True) -> dict:
    _quiet_streamlit()
    from dashboard import resources
    from engine.generate import generate
    from engine.trace import run_trace

    cfg = resources.get_config()
    warm = _session(max_new_tokens)  # loads the model and opens the database once per process
    warm.chat_input[0].set_value(PROMPT)
    _timed_run(warm)  # warm-up turn: caches, allocator, first-call costs
    from dashboard.panels import CHAT_PANELS

    panels = [p.title for p in CHAT_PANELS]
    if not with_panels:  # the chat page draws no extension panels (they registered on import, once)
        CHAT_PANELS.clear()
    lm = resources.get_model(cfg).lm
    db_ok = resources.get_db(cfg).db is not None

    ui_turn, ui_gen, ui_trace_engine, raw_trace, raw_gen, same_reply, n_tokens, ratios = [], [], [], [], [], [], [], []
    rerun, rerun_inspect, rerun_objective = [], [], []
    chat = [{"role": "user", "content": PROMPT}]
    for _ in range(repeats):
        # raw engine: the same greedy reply, then the trace of the conversation, before and after the UI turn
        t0 = time.perf_counter()
        g = generate(lm, chat, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        raw_gen.append(time.perf_counter() - t0)
        full = chat + [{"role": "assistant", "content": g.text}]
        t0 = time.perf_counter()
        tr = run_trace(lm, full, add_generation_prompt=False)
        before = time.perf_counter() - t0
        n_tokens.append(len(tr.tokens))

        at = _session(max_new_tokens)
        at.chat_input[0].set_value(PROMPT)
        ui_turn.append(_timed_run(at))
        t = at.session_state["_timings"]
        ui_gen.append(t["generate_s"])
        ui_trace_engine.append(t["trace_s"])
        same_reply.append(at.session_state["messages"][-1]["content"] == g.text)

        t0 = time.perf_counter()
        run_trace(lm, full, add_generation_prompt=False)
        raw_trace.append((before + time.perf_counter() - t0) / 2)  # brackets the UI turn in time
        ratios.append((ui_turn[-1] - ui_gen[-1]) / raw_trace[-1])

        # display-only reruns on this session
        for i in range(rerun_repeats):
            at.slider(key="w_threshold").set_value(1.5 if i % 2 == 0 else 1.0)
            rerun.append(_timed_run(at))
        options = at.selectbox(key="w_inspect").options
        for i in range(min(rerun_repeats, max(len(options) - 1, 0))):
            at.selectbox(key="w_inspect").set_value(at.session_state["_table_ids"][i + 1])
            rerun_inspect.append(_timed_run(at))
        at.segmented_control(key="w_mode").set_value("Attribution")
        _timed_run(at)  # computes the attribution trace once
        for i in range(rerun_repeats):
            at.radio(key="w_objective").set_value("prob" if i % 2 == 0 else "logprob")
            rerun_objective.append(_timed_run(at))

    med = statistics.median
    ui_trace_part = [u - g for u, g in zip(ui_turn, ui_gen)]
    return {
        "benchmark": "dashboard",
        "model": lm.name,
        "database": str(cfg.db_path) if db_ok else None,
        "prompt": PROMPT,
        "max_new_tokens": max_new_tokens,
        "conversation_tokens": int(med(n_tokens)),
        "chat_panels_drawn": panels if with_panels else [],
        "repeats": repeats,
        "ui_turn_s": round(med(ui_turn), 4),
        "ui_generate_s": round(med(ui_gen), 4),
        "ui_trace_part_s": round(med(ui_trace_part), 4),
        "ui_engine_trace_s": round(med(ui_trace_engine), 4),
        "raw_generate_s": round(med(raw_gen), 4),
        "raw_trace_s": round(med(raw_trace), 4),
        "ui_overhead_ratio": round(med(ratios), 3),
        "ui_overhead_ratio_per_turn": [round(r, 3) for r in ratios],
        "ui_rendering_s": round(med([p - e for p, e in zip(ui_trace_part, ui_trace_engine)]), 4),
        "ui_turn_ratio": round(med(ui_turn) / (med(raw_gen) + med(raw_trace)), 3),
        "rerun_ms": round(1000 * med(rerun), 1),
        "rerun_inspect_ms": round(1000 * med(rerun_inspect), 1) if rerun_inspect else None,
        "rerun_attribution_objective_ms": round(1000 * med(rerun_objective), 1),
        "same_reply_as_raw": all(same_reply),
        "targets": {"ui_overhead_ratio": 1.5, "rerun_ms": 300},
        "definitions": "ui_trace_part_s = ui_turn_s - ui_generate_s (submit to rendered trace, reply excluded); "
                       "ui_overhead_ratio = median per turn of ui_trace_part_s / raw_trace_s (raw traces bracket the "
                       "turn); ui_turn_ratio = ui_turn_s / "
                       "(raw_generate_s + raw_trace_s); reruns change one display widget after the turn",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def _fresh(flag: str, env: dict) -> dict:
    """Run this module with ``flag`` in a fresh process; its one JSON line."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "benchmarks.dashboard", flag], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _first_trace() -> dict:
    """(in a fresh process, no database) start → the first turn's trace rendered."""
    _quiet_streamlit()
    at = _session(8)
    at.chat_input[0].set_value(PROMPT)
    at.run()
    if at.exception:
        raise SystemExit(f"the app raised: {at.exception[0].value}")
    if not any(d.key == "neuron_table" and len(d.value) for d in at.dataframe):
        raise SystemExit("no trace table after the first turn")
    return {"first_trace_no_db_s": round(time.perf_counter() - T0, 2)}


def _vm_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MB, from /proc (ru_maxrss would carry
    the parent's peak across fork and exec)."""
    from precompute.pipeline import proc_mb

    value = proc_mb(field)
    if value is None:
        raise SystemExit(f"/proc/self/status has no {field}")
    return value


def _three_sessions() -> dict:
    """(in a fresh process) peak RSS while three sessions share one model and database."""
    _quiet_streamlit()
    import dashboard.resources  # noqa: F401  (the app's imports, before the model loads)

    idle = _vm_mb("VmHWM")
    sessions = [_session(16) for _ in range(3)]
    for at in sessions:
        at.chat_input[0].set_value(PROMPT)
        at.run()
        _check(at)
    return {"app_rss_mb_idle": round(idle), "app_rss_mb_3_sessions": round(_vm_mb("VmHWM")),
            "app_rss_mb_3_sessions_now": round(_vm_mb("VmRSS"))}


def hosting(db: str | None, clone: str | None = None) -> dict:
    """The hosting figures (see the module docstring); ``clone``: run ``benchmarks.clone`` up to
    ``descriptions`` or the ``full`` database first, for the clone and build figures."""
    import tempfile

    from cache.bundle import write_bundle
    from cache.paths import db_path

    src = db or os.environ.get("MONITOR_DB") or str(db_path(os.environ.get("MONITOR_MODEL", "embedded")))
    out: dict = {"benchmark": "dashboard-hosting", "host": platform.node(), "load_avg_1m": os.getloadavg()[0]}
    fresh = None
    if clone:  # first, while nothing else of this benchmark runs
        from benchmarks.clone import run as run_clone

        fresh = run_clone(clone, None, keep=False)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "demo.duckdb"
        t0 = time.perf_counter()
        rep = write_bundle(src, bundle, progress=False)
        out.update({"bundle_mb": rep["bundle_mb"], "bundle_source_mb": rep["source_mb"],
                    "bundle_ratio": round(rep["bundle_mb"] / rep["source_mb"], 3),
                    "bundle_overlap_min": rep["overlap_min"], "bundle_s": round(time.perf_counter() - t0, 1)})
        out.update(_fresh("--_first-trace", {"MONITOR_DB": str(Path(tmp) / "missing.duckdb")}))
        out.update(_fresh("--_three-sessions", {"MONITOR_DB": str(bundle), "MONITOR_HOSTED": "1"}))
    keys = ("clone_to_first_trace_s", "clone_to_descriptions_s", "build_peak_rss_mb", "partial_build_peak_rss_mb",
            "clone_to_full_db_s", "setup_s", "first_turn_s")
    if fresh is None:
        out.update({k: None for k in keys[:3]})
        out["not_measured"] = "--clone descriptions|full (python -m benchmarks.clone) measures these"
    else:
        out.update({k: fresh.get(k) for k in keys})
        if fresh.get("build_peak_rss_mb") is None:  # --clone descriptions: the peak so far is the partial build's
            out["build_peak_rss_mb"] = fresh.get("partial_build_peak_rss_mb")
    out["goals"] = {"bundle_mb": 100, "first_trace_s": 180, "app_rss_mb_3_sessions": 1500, "build_peak_rss_mb": 2500}
    out["load_avg_1m_end"] = os.getloadavg()[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh sessions (chat turns) to time")
    p.add_argument("--rerun-repeats", type=int, default=5, help="display reruns per session")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--db", default=None, help="neuron database (default: MONITOR_DB or the model's)")
    p.add_argument("--model", default=None, help="model (default: MONITOR_MODEL or embedded)")
    p.add_argument("--no-panels", action="store_true",
                   help="leave out the chat page's extension panels (dashboard.panels), to time the core page")
    p.add_argument("--json", action="store_true", help="print JSON on one line (JSON is printed either way)")
    p.add_argument("--hosting", action="store_true", help="the hosting figures instead (bundle, first trace, 3 sessions)")
    p.add_argument("--clone", choices=["descriptions", "full"], default=None,
                   help="with --hosting: first time a fresh clone's make demo (benchmarks.clone) up to the first "
                        "descriptions or the full database")
    p.add_argument("--_first-trace", dest="first_trace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_three-sessions", dest="three_sessions", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.first_trace or args.three_sessions:
        print(json.dumps(_first_trace() if args.first_trace else _three_sessions()))
        return
    if args.db:
        os.environ["MONITOR_DB"] = args.db
    if args.model:
        os.environ["MONITOR_MODEL"] = args.model
    if args.hosting:
        print(json.dumps(hosting(args.db, args.clone), indent=None if args.json else 2))
        return
    result = run(args.repeats, args.max_new_tokens, args.rerun_repeats, with_panels=not args.no_panels)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
