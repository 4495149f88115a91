"""Benchmark: a fresh clone's ``make demo``, as a new user runs it, timed in a real browser (issue 10).

``python -m benchmarks.clone --json`` clones this repository into a temporary folder (``git clone``
of the current commit: no ``.venv``, no ``data/``), starts the clock, and runs ``make demo`` there:
``make setup`` (a new virtual environment from the packages already in pip's local cache, and the
embedded model converted), the background database build (a quick partial database first, then
the full one) and the Streamlit server. Debian's chromium (Playwright) then does what a user does.

* ``clone_to_first_trace_s``: clone → the first chat turn's trace on screen (goal ≤ 180 s);
  ``setup_s`` is the part before the server answered, ``first_turn_s`` the turn itself.
* ``clone_to_descriptions_s``: clone → the quick partial database open in that same browser
  session (its banner drawn: the page picked it up without a reload; goal ≤ 300 s).
* ``build_peak_rss_mb``: the background build's peak memory. The build process runs each stage
  in a child process of its own (a fork of it), so this is the larger of the process
  tree's summed ``Pss`` (shared pages counted once; sampled every second) and the largest single
  process's ``VmHWM`` (exact). With ``--until full`` (the default) the whole build, else up to the
  partial database (``partial_build_peak_rss_mb``); ``*_peak_tree_pss_mb``,
  ``*_peak_one_process_mb`` and ``*_build_process_mb`` (the build process alone) beside it.
  ``clone_to_full_db_s``: clone → the full database written (``--until full``).

Beside the totals, the parts measured in the same run: ``setup_s`` (clone → the server answering:
``make setup`` and the server's start), ``first_turn_s`` (the chat turn alone, the model's first
load included) and ``stages_finished_at_s`` (when each build stage finished). ``load_avg_1m`` at
the start and the end says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "Which is bigger: 9.8 or 9.11?"
SETUP_S = 1800  # make setup from an empty .venv, then the server
GOALS = {"clone_to_first_trace_s": 180, "clone_to_descriptions_s": 300, "build_peak_rss_mb": 2500}


def _build_pid(db: Path) -> int | None:
    from cache.build_status import read_status

    status = read_status(db)
    return (status.launched or {}).get("pid") if status is not None else None


def run(until: str, port: int | None, keep: bool) -> dict:
    from playwright.sync_api import sync_playwright

    from cache.build_status import is_locked
    from precompute.pipeline import peak_rss_mb, process_tree, tree_pss_mb
    from tests.test_e2e_dashboard import (CHROMIUM, CHROMIUM_ARGS, _free_port, _open_chat, _send, _wait_for_trace,
                                          stop_demo, wait_for_health)

    out: dict = {"benchmark": "clone", "host": platform.node(), "cpus": os.cpu_count(),
                 "load_avg_1m": round(os.getloadavg()[0], 2), "until": until}
    tmp = Path(tempfile.mkdtemp(prefix="monitor-clone-"))
    clone = tmp / "clone"
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONITOR_", "PRECOMPUTE_", "STREAMLIT_", "VIRTUAL_ENV"))}
    env.update({"STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
                "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"})
    db = clone / "data" / "smollm2-135m-instruct.duckdb"
    partial = clone / "data" / "smollm2-135m-instruct.partial.duckdb"
    log = tmp / "make-demo.log"
    t0, start = time.perf_counter(), time.time()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    fh = open(log, "wb")
    proc = subprocess.Popen(["make", "demo", f"PORT={port}"], cwd=clone, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    peak = {"tree_pss": 0.0, "one_process": 0.0, "build_process": 0.0}
    build_pid = None

    def poll_peak() -> None:
        nonlocal build_pid
        build_pid = build_pid or (_build_pid(db) if (clone / "data").exists() else None)
        if build_pid:
            tree = process_tree(build_pid)
            peak["tree_pss"] = max(peak["tree_pss"], tree_pss_mb(build_pid, tree) or 0.0)
            peak["build_process"] = max(peak["build_process"], peak_rss_mb(build_pid) or 0.0)
            for pid in tree:
                peak["one_process"] = max(peak["one_process"], peak_rss_mb(pid) or 0.0)
            peak["one_process"] = max(peak["one_process"], _marker_peak(clone))  # a stage that ended between polls

    def peaks(prefix: str) -> dict:
        """The build's peak memory so far: ``<prefix>_peak_rss_mb`` the larger of the process
        tree's summed PSS (sampled each second) and the largest one process's VmHWM (exact);
        the build process alone (it runs no stage: each runs in a child of its own) beside them."""
        return {f"{prefix}_peak_rss_mb": round(max(peak["tree_pss"], peak["one_process"])),
                f"{prefix}_peak_tree_pss_mb": round(peak["tree_pss"]),
                f"{prefix}_peak_one_process_mb": round(peak["one_process"]),
                f"{prefix}_build_process_mb": round(peak["build_process"])}

    try:
        wait_for_health(url, proc, log, timeout=SETUP_S, tick=poll_peak)  # make setup, then the server
        out["setup_s"] = round(time.perf_counter() - t0, 1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = _open_chat(browser.new_context(viewport={"width": 1440, "height": 2000}), url)
            t1 = time.perf_counter()
            _send(page, PROMPT)
            _wait_for_trace(page, "Which is bigger")
            out["first_turn_s"] = round(time.perf_counter() - t1, 1)
            out["clone_to_first_trace_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(out), file=sys.stderr, flush=True)
            out["db_present_at_first_trace"] = db.exists() or partial.exists()
            while not page.get_by_text("Partial database:").count():  # the page reruns itself when it lands
                if db.exists():
                    break
                poll_peak()
                page.wait_for_timeout(1000)
            out["clone_to_descriptions_s"] = round(time.perf_counter() - t0, 1)
            out.update(peaks("partial_build"))
            print(json.dumps(out), file=sys.stderr, flush=True)  # so far, in case the full build is cut short
            browser.close()
        if until == "full":
            while is_locked(db) or not db.exists():
                poll_peak()
                if proc.poll() is not None:
                    raise SystemExit(f"the dashboard exited with {proc.returncode}")
                time.sleep(1.0)
            out["clone_to_full_db_s"] = round(time.perf_counter() - t0, 1)
            out.update(peaks("build"))
        else:
            out["build_peak_rss_mb"] = None
        out["stages_finished_at_s"] = _stage_times(clone, start)
    finally:
        stop_demo(proc, db)
        fh.close()
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp)])
        else:
            out["kept"] = str(tmp)
    out["goals"] = GOALS
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return out


def _marker_peak(clone: Path) -> float:
    """The largest ``peak_rss_mb`` a finished stage recorded in its marker (its own process's VmHWM)."""
    best = 0.0
    for done in (clone / "data" / "build").glob("*/*.done"):
        try:
            best = max(best, float(json.loads(done.read_text()).get("peak_rss_mb") or 0.0))
        except (OSError, ValueError):
            continue
    return best


def _stage_times(clone: Path, start: float) -> dict:
    """When each stage finished, in seconds after the clone started, per build folder still on disk
    (the ``<stage>.done`` markers; the partial build's folder is deleted when the full one lands)."""
    return {f"{done.parent.name}/{done.stem}": round(done.stat().st_mtime - start, 1)
            for done in sorted((clone / "data" / "build").glob("*/*.done"), key=lambda d: d.stat().st_mtime)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--until", choices=["descriptions", "full"], default="full",
                   help="stop after the first descriptions, or wait for the full database (default)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the clone (its data/ and logs) and print where")
    p.add_argument("--json", action="store_true", help="print JSON on one line (JSON is printed either way)")
    args = p.parse_args()
    import signal

    # SIGTERM (kill, pkill, a CI timeout) raises SystemExit, so run()'s finally blocks still stop the
    # clone's Streamlit server and background build instead of leaving them running
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(args.until, args.port, args.keep)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
