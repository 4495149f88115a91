"""A database build in progress, as its files record it: the lock, the launch record, the progress file.

A background build (``precompute.background``) leaves three files next to the database
``data/<slug>.duckdb``:

- ``<db>.build.lock``: held (``flock``) by the build process for its whole life, so "is a build
  running?" is a non-blocking lock attempt; a killed build releases it with its last breath.
- ``<db>.build.json``: how it was launched (pid, model, build folder, log, start time).
- ``<db>.build.log``: its output.

The build folder holds ``progress.json`` (:class:`ProgressFile`): the running stage, its index,
and the current progress bar's count, total and start time. This module owns those formats, for
the writer (the pipeline) and the readers (``python -m precompute status``, the dashboard). It
imports neither torch nor Streamlit.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

PROGRESS_FILE = "progress.json"


def lock_path(db: Path) -> Path:
    return Path(f"{db}.build.lock")


def record_path(db: Path) -> Path:
    return Path(f"{db}.build.json")


def log_path(db: Path) -> Path:
    return Path(f"{db}.build.log")


def write_json(path: Path, data: dict, indent: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """``path``'s JSON object, {} when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_locked(db: Path) -> bool:
    """Whether a build process holds ``<db>.build.lock`` now."""
    path = lock_path(db)
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


class ProgressFile:
    """The build folder's ``progress.json``: which stage runs, and its progress bar's count.

    Writes are atomic and throttled to one per ``every_s`` seconds (and one at every stage
    start and bar end), so a fast loop does not spend its time on the file."""

    def __init__(self, root: Path, every_s: float = 1.0):
        self.path = Path(root) / PROGRESS_FILE
        self.every_s = every_s
        self.data: dict = {}
        self._last = 0.0

    def stage(self, name: str, index: int, n_stages: int) -> None:
        """Stage ``name`` (``index`` of ``n_stages``, from 1) starts now."""
        now = time.time()
        self.data = {"stage": name, "index": index, "n_stages": n_stages, "stage_started": now,
                     "pid": os.getpid(), "updated": now}
        self._flush(force=True)

    def bar(self, bar, total: int, desc: str, initial: int = 0) -> "StageBar":
        """Wrap a tqdm ``bar`` so its count also lands in the file."""
        self.data.update({"desc": desc, "n": initial, "total": total, "initial": initial, "bar_started": time.time()})
        self._flush(force=True)
        return StageBar(self, bar)

    def finished(self) -> None:
        """Every stage asked for is done."""
        self.data.update({"stage": "finished", "updated": time.time()})
        self._flush(force=True)

    def _flush(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self.data["updated"] = now
        self._last = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.data)
        except OSError:  # the progress file is a courtesy: never fail a build over it
            pass


class StageBar:
    """A tqdm bar (``update``/``close``) whose count is mirrored in a :class:`ProgressFile`."""

    def __init__(self, pf: ProgressFile, bar):
        self.pf, self.bar = pf, bar

    def update(self, k: int = 1) -> None:
        self.bar.update(k)
        self.pf.data["n"] = self.pf.data.get("n", 0) + k
        self.pf._flush()

    def close(self) -> None:
        self.bar.close()
        self.pf._flush(force=True)


@dataclass
class BuildStatus:
    """What the files say about ``db``'s build (see the module docstring)."""

    db: Path
    running: bool
    launched: dict  # <db>.build.json ({} when no background build was started)
    progress: dict  # progress.json ({} when none)
    log_tail: list[str]

    @property
    def stage(self) -> str | None:
        return self.progress.get("stage")

    def fraction(self) -> float | None:
        """The running bar's fraction done (n / total), or None without a bar."""
        n, total = self.progress.get("n"), self.progress.get("total")
        if n is None or not total:
            return None
        return min(1.0, max(0.0, n / total))

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left in the current bar: ``(total − n) · elapsed / (n − initial)``, at this
        bar's own rate since it started (None before its first step)."""
        p = self.progress
        n, total, initial, t0 = p.get("n"), p.get("total"), p.get("initial", 0), p.get("bar_started")
        if n is None or not total or t0 is None or n <= initial:
            return None
        elapsed = (now or time.time()) - t0
        return max(0.0, (total - n) * elapsed / (n - initial))

    def sentence(self) -> str:
        """One line for a user: what is running, its progress and time left, or why it stopped."""
        if not self.running:
            if self.db.exists():
                return f"The neuron database {self.db.name} is ready."
            last = next((ln for ln in reversed(self.log_tail) if ln.strip()), "")
            stopped = f" It stopped at stage {self.stage!r}" if self.stage and self.stage != "finished" else ""
            why = f" (last log line: {last.strip()[:200]})" if last else ""
            return (f"The background database build is not running.{stopped}{why} Run `make demo` (or "
                    f"`python -m precompute background`) to resume it; log: {log_path(self.db)}.")
        p = self.progress
        if not p.get("stage"):
            return f"The neuron database is being built in the background (starting; log: {log_path(self.db)})."
        text = f"The neuron database is being built in the background: stage {p.get('index')} of {p.get('n_stages')}, {p['stage']}"
        frac = self.fraction()
        if frac is not None and p.get("desc"):
            text += f" ({p['desc']}: {p.get('n')}/{p.get('total')}, {frac:.0%}"
            eta = self.eta_s()
            text += f", about {format_duration(eta)} left in this stage)" if eta is not None else ")"
        else:
            text += f" (running for {format_duration(time.time() - p.get('stage_started', time.time()))})"
        return text + ". Pages pick the database up when it is ready, without a restart."


def format_duration(s: float) -> str:
    """``42 s``, ``3 min``, ``1 h 05 min``."""
    s = max(0, int(round(s)))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def read_status(db: Path, tail: int = 5) -> BuildStatus | None:
    """The build status of database ``db``, or None when no background build was ever started for it."""
    db = Path(db)
    launched = read_json(record_path(db))
    if not launched:
        return None
    progress = read_json(Path(launched.get("work_dir", "")) / PROGRESS_FILE) if launched.get("work_dir") else {}
    lines: list[str] = []
    try:
        with open(log_path(db), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()[-tail:]
    except OSError:
        pass
    return BuildStatus(db=db, running=is_locked(db), launched=launched, progress=progress, log_tail=lines)
