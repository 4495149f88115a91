"""Starting (or resuming) the database build as a separate background process, one at a time.

``make demo`` calls ``python -m precompute background`` and then opens the dashboard at once:

- When the database exists, nothing starts.
- When a build holds ``<db>.build.lock`` (see :mod:`cache.build_status`), nothing starts either:
  a second ``make demo`` reports the running build instead of starting a second one.
- Otherwise it launches ``python -m precompute build <the same options> --partial-first`` in its
  own session (so Ctrl-C on the dashboard does not reach it), with its output in
  ``<db>.build.log``, and hands it the lock: the child inherits the locked descriptor and holds it
  until it exits or is killed. That one process first writes the quick partial database
  (:mod:`precompute.quick`; skipped when it exists) and then the full one, so the chain holds one
  lock from start to end. A killed chain resumes from its stage markers on the next launch, as any
  build does. ``--no-partial`` launches the full build alone.

The launch record (``<db>.build.json``) lists the chain's ``phases``, each ``{build: "partial" |
"full", db, work_dir}`` (the partial one also ``layers`` and ``n_sequences``), so a reader knows
which build runs: the first whose database is still missing (:func:`cache.build_status.read_status`).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cache.build_status import cover, lock_path, log_path, read_json, record_path, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Launch:
    """What :func:`start` did: ``started`` a new process, found one ``running``, or found the database ``ready``."""

    state: str  # "started" | "running" | "ready"
    pid: int | None
    log: Path
    phases: list[dict] | None = None  # the chain's builds (see the module docstring); None: the full build alone

    def sentence(self, db: Path) -> str:
        if self.state == "ready":
            return f"The neuron database {db} is present; no build needed."
        verb = "Started" if self.state == "started" else "A build is already running:"
        plan = ""
        quick = next((p for p in self.phases or [] if p.get("build") == "partial"), None)
        if quick is not None:
            first = ("the quick partial database is present, so the full one" if Path(quick["db"]).exists() else
                     f"first a quick partial database ({cover(quick)}) → {quick['db']}, then the full one")
            plan = f": {first} → {db}"
        return (f"{verb} the database build in the background (pid {self.pid}){plan}; log: {self.log}. "
                f"`python -m precompute status` shows its progress.")


def start(build_argv: list[str], db: Path, work_dir: Path, model: str, partial: dict | None = None) -> Launch:
    """Launch ``python -m precompute build *build_argv`` in the background unless ``db`` exists or
    a build of it runs already (see the module docstring).

    ``partial`` ({db, work_dir, layers, n_sequences}): the quick partial build that ``build_argv``
    (with ``--partial-first``) runs first; it is recorded as the chain's first phase."""
    db = Path(db)
    log = log_path(db)
    if db.exists():
        return Launch("ready", None, log)
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(db), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = read_json(record_path(db))
            return Launch("running", record.get("pid"), log, record.get("phases"))
        if db.exists():  # finished between the first check and the lock
            return Launch("ready", None, log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                     f"python -m precompute build {' '.join(build_argv)}\n".encode())
            fh.flush()
            proc = subprocess.Popen([sys.executable, "-m", "precompute", "build", *build_argv], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(fd,))
        phases = None
        if partial is not None:
            phases = [{"build": "partial", **partial, "db": str(Path(partial["db"]).resolve()),
                       "work_dir": str(Path(partial["work_dir"]).resolve())},
                      {"build": "full", "db": str(db.resolve()), "work_dir": str(Path(work_dir).resolve())}]
        write_json(record_path(db), {"pid": proc.pid, "model": model, "work_dir": str(Path(work_dir).resolve()),
                                      "db": str(db.resolve()), "log": str(log.resolve()), "argv": build_argv,
                                      "started": time.time(), **({"phases": phases} if phases else {})})
        return Launch("started", proc.pid, log, phases)
    finally:
        os.close(fd)  # the child keeps its own copy of the locked descriptor
