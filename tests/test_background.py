"""The background build behind ``make demo``: one build at a time, killed and resumed, and the
dashboard showing its stage while it runs and opening the database when it lands (no restart).

Real subprocess builds of the tiny random Llama (seconds each), started through the same
``python -m precompute background`` command the Makefile runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cache.build_status import is_locked, read_status

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def _args(model: Path, root: Path) -> list[str]:
    # the full build alone: the quick partial database built first is tests/test_background_partial.py's
    return ["--model", str(model), "--profile", "tiny", "--n-sequences", "48", "--batch-size", "8",
            "--work-dir", str(root / "build"), "--db", str(root / "neurons.duckdb"), "--quiet", "--no-partial"]


def _background(args, capsys) -> str:
    from precompute.__main__ import main

    assert main(["background", *args]) == 0
    return capsys.readouterr().out


def _wait_unlocked(db: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while is_locked(db):
        assert time.time() < deadline, f"the background build of {db} did not end within {timeout} s"
        time.sleep(0.5)


def _pid_alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by this test process, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_background_build_runs_once_survives_a_kill_and_resumes(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    args = _args(tiny_llama_dir, tmp_path)
    db, work = tmp_path / "neurons.duckdb", tmp_path / "build"

    # 1. a build killed in the middle of the descriptions stage (after layer 0 is written)
    monkeypatch.setenv("PRECOMPUTE_KILL_AT", "descriptions:1")
    out = _background(args, capsys)
    assert "Started the database build in the background" in out
    first_pid = read_status(db).launched["pid"]
    out = _background(args, capsys)  # a second `make demo` while it runs starts nothing
    assert "already running" in out and f"pid {first_pid}" in out
    _wait_unlocked(db)
    assert not db.exists() and not _pid_alive(first_pid)
    status = read_status(db)
    assert not status.running and status.stage == "descriptions"
    assert status.progress["n"] == 0 and status.progress["total"] == 3  # killed before its first layer counted
    assert "not running" in status.sentence() and "'descriptions'" in status.sentence()
    layer0 = work / "descriptions" / "layer-000.parquet"
    assert layer0.exists() and not (work / "descriptions" / "layer-001.parquet").exists()
    layer0_mtime = layer0.stat().st_mtime_ns

    # 2. the dashboard's resources while nothing runs: the stopped build is named, nothing is cached
    from dashboard import resources

    monkeypatch.setenv("MONITOR_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("MONITOR_DB", str(db))
    cfg = resources.get_config()
    r = resources.get_db(cfg)
    assert r.db is None and not r.building and "No neuron database" in r.error

    # 3. the next `make demo` resumes it; while it runs the dashboard says which stage
    monkeypatch.delenv("PRECOMPUTE_KILL_AT")
    out = _background(args, capsys)
    assert "Started" in out
    pid = read_status(db).launched["pid"]
    assert pid != first_pid
    seen_building = False
    while is_locked(db):
        r = resources.get_db(cfg)
        if r.building:
            seen_building = True
            assert r.db is None and "being built in the background" in r.error
        time.sleep(0.2)
    assert seen_building, "the dashboard never saw the running build"
    assert db.exists()
    assert layer0.stat().st_mtime_ns == layer0_mtime, "the resumed build redid a finished layer"
    assert read_status(db).stage == "finished"

    # 4. the same process picks the database up without a restart
    r = resources.get_db(cfg)
    assert r.db is not None and r.error is None
    assert r.db.n_layers == 3 and r.db.counts()["descriptions"] == 3 * 96 * 2
    assert "present; no build needed" in _background(args, capsys)


def test_sidebar_shows_a_running_build_and_its_stage(tiny_llama_dir, tmp_path, monkeypatch):
    """The sidebar panel words the progress file: stage, counts and time left."""
    import json

    from streamlit.testing.v1 import AppTest

    from cache.build_status import ProgressFile, lock_path, record_path

    db, work = tmp_path / "x.duckdb", tmp_path / "build"
    record_path(db).write_text(json.dumps({"pid": os.getpid(), "work_dir": str(work)}))
    pf = ProgressFile(work)
    pf.stage("descriptions", 4, 7)
    bar = pf.bar(_NullBar(), 30, "descriptions (per layer)")
    bar.update(12)
    bar.close()
    import fcntl

    with open(lock_path(db), "w") as fh:  # this test process plays the running build
        fcntl.flock(fh, fcntl.LOCK_EX)
        monkeypatch.setenv("MONITOR_MODEL", str(tiny_llama_dir))
        monkeypatch.setenv("MONITOR_DB", str(db))
        at = AppTest.from_file(str(APP), default_timeout=300)  # the chat page (AppTest runs the sidebar only there)
        at.run()
        assert not at.exception
        side = " ".join(c.value for c in at.caption)
        assert "stage 4 of 7, descriptions (descriptions (per layer): 12/30, 40%" in side
        assert "left in this stage" in side
        assert [p.value for p in at.get("progress")] == [40]
        assert any("being built in the background" in w.value for w in at.warning)  # the chat page's note
    at = AppTest.from_file(str(APP), default_timeout=300).run()  # the build is gone (lock released):
    side = " ".join(c.value for c in at.caption)
    assert "not running" in side and "make demo" in side  # the panel says it stopped and how to resume


class _NullBar:
    def update(self, k=1):
        pass

    def close(self):
        pass
