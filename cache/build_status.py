"""A database build in progress, as its files record it: the lock, the launch record, the progress file.

A background build (``precompute.background``) leaves three files next to the database
``data/<slug>.duckdb``:

- ``<db>.build.lock``: held (``flock``) by the build process for its whole life, so "is a build
  running?" is a non-blocking lock attempt; a killed build releases it with its last breath.
- ``<db>.build.json``: how it was launched (pid, model, build folder, log, start time).
- ``<db>.build.log``: its output.

A background build may be a chain of two builds in one process (``precompute.quick``): a quick
partial database ``<db>.partial.duckdb``, then the full one. The launch record lists them as
``phases``; the running one is the first whose database is missing (:func:`current_phase`), and
its build folder's progress file is the one read.

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
from dataclasses import dataclass, field
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
    progress: dict  # progress.json of the current phase's build folder ({} when none)
    log_tail: list[str]
    phase: dict = field(default_factory=dict)  # the chain's current build ({} for a lone full build)

    @property
    def stage(self) -> str | None:
        return self.progress.get("stage")

    @property
    def build(self) -> str:
        """Which build the progress is of: ``partial`` (the quick one) or ``full``."""
        return self.phase.get("build", "full")

    @property
    def chained(self) -> bool:
        """Whether this background build builds a quick partial database before the full one."""
        return len(self.launched.get("phases") or []) > 1

    def which(self) -> str:
        """The build in words: ``the quick partial database (build 1 of 2: layers 0, 5; 256 sequences)``,
        ``the full database (build 2 of 2)``, or ``the neuron database`` for a lone build."""
        if not self.chained:
            return "the neuron database"
        phases = self.launched["phases"]
        i = next((j for j, p in enumerate(phases) if p.get("build") == self.build), len(phases) - 1)
        if self.build == "partial":
            return f"the quick partial database (build {i + 1} of {len(phases)}: {cover(self.phase)})"
        return f"the full database (build {i + 1} of {len(phases)})"

    def stage_words(self) -> str:
        """``stage 4 of 7, descriptions (descriptions (per layer): 12/30, 40%, about 3 min left in this
        stage)``, or ``starting``."""
        p = self.progress
        if not p.get("stage") or p.get("stage") == "finished":
            return "starting"
        text = f"stage {p.get('index')} of {p.get('n_stages')}, {p['stage']}"
        frac = self.fraction()
        if frac is not None and p.get("desc"):
            text += f" ({p['desc']}: {p.get('n')}/{p.get('total')}, {frac:.0%}"
            eta = self.eta_s()
            text += f", about {format_duration(eta)} left in this stage)" if eta is not None else ")"
        else:
            text += f" (running for {format_duration(time.time() - p.get('stage_started', time.time()))})"
        return text

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
        """One line for a user: which build (partial or full) runs, its progress and time left, or why it stopped."""
        if not self.running:
            if self.db.exists():
                return f"The neuron database {self.db.name} is ready."
            last = next((ln for ln in reversed(self.log_tail) if ln.strip()), "")
            of = f" of the {self.build} build" if self.chained else ""
            stopped = f" It stopped at stage {self.stage!r}{of}" if self.stage and self.stage != "finished" else ""
            why = f" (last log line: {last.strip()[:200]})" if last else ""
            return (f"The background database build is not running.{stopped}{why} Run `make demo` (or "
                    f"`python -m precompute background`) to resume it; log: {log_path(self.db)}.")
        which = self.which()
        if not self.progress.get("stage") or self.progress.get("stage") == "finished":
            return f"{which[0].upper()}{which[1:]} is being built in the background (starting; log: {log_path(self.db)})."
        text = f"{which[0].upper()}{which[1:]} is being built in the background: {self.stage_words()}"
        if self.chained and self.build == "partial":
            return text + ". The full database follows; pages pick each up when it is ready, without a restart."
        return text + ". Pages pick the database up when it is ready, without a restart."

    def partial_banner(self, meta: dict | None = None) -> str:
        """The banner over pages showing the partial database (``meta``: its meta, for what it covers)."""
        return partial_banner(meta or {}, self)


def cover(phase: dict) -> str:
    """What a partial build covers, in words: ``layers 0, 5, 10; 256 sequences``."""
    layers = ", ".join(map(str, phase.get("layers") or [])) or "?"
    return f"layers {layers}; {phase.get('n_sequences', '?')} sequences"


def partial_banner(meta: dict, status: "BuildStatus | None") -> str:
    """One line for the pages while they show a quick partial database (meta ``partial``):
    ``Partial database: layers 0, 5, 10, 15, 20, 25; 256 sequences. The full build is running:
    stage 2 of 7, activations (…, about 20 min left in this stage). …``"""
    try:
        layers = json.loads(meta.get("described_layers") or "null")
    except ValueError:
        layers = None
    covers = cover({"layers": layers, "n_sequences": meta.get("n_sequences", "?")}) if layers else \
        f"all layers; {meta.get('n_sequences', '?')} sequences"
    text = f"Partial database: {covers}."
    if status is None:
        return text + " The full database is missing: build it with `make demo` (or `python -m precompute background`)."
    if status.running:
        if status.build == "partial":
            return text + " The full build starts next."
        return (text + f" The full build is running: {status.stage_words()}. Pages switch to the full "
                       "database when it lands, without a restart.")
    stopped = f" (it stopped at stage {status.stage!r})" if status.stage and status.stage != "finished" else ""
    return text + f" The full build is not running{stopped}: run `make demo` to resume it; log: {log_path(status.db)}."


def current_phase(launched: dict) -> dict:
    """The chain's build that runs (or ran last): the one after the last phase whose database exists
    (the first when none does; the last when it does); {} when the record lists no phases (a lone
    full build). A later database wins: the chain deletes the partial database once the full one lands."""
    phases = launched.get("phases") or []
    if not phases:
        return {}
    done = [i for i, p in enumerate(phases) if p.get("db") and Path(p["db"]).exists()]
    return phases[min(done[-1] + 1, len(phases) - 1)] if done else phases[0]


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
    phase = current_phase(launched)
    work_dir = phase.get("work_dir") or launched.get("work_dir")
    progress = read_json(Path(work_dir) / PROGRESS_FILE) if work_dir else {}
    lines: list[str] = []
    try:
        with open(log_path(db), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()[-tail:]
    except OSError:
        pass
    return BuildStatus(db=db, running=is_locked(db), launched=launched, progress=progress, log_tail=lines, phase=phase)
