"""Starting (or resuming) the database build as a separate background process, one at a time.

``make demo`` calls ``python -m precompute background`` and then opens the dashboard at once:

- When the database exists, nothing starts.
- When a build holds ``<db>.build.lock`` (see :mod:`cache.build_status`), nothing starts either:
  a second ``make demo`` reports the running build instead of starting a second one.
- Otherwise it launches ``python -m precompute build <the same options>`` in its own session
  (so Ctrl-C on the dashboard does not reach it), with its output in ``<db>.build.log``, and
  hands it the lock: the child inherits the locked descriptor and holds it until it exits or
  is killed. A killed build resumes from its stage markers on the next launch, as any build does.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cache.build_status import lock_path, log_path, read_json, record_path, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Launch:
    """What :func:`start` did: ``started`` a new process, found one ``running``, or found the database ``ready``."""

    state: str  # "started" | "running" | "ready"
    pid: int | None
    log: Path

    def sentence(self, db: Path) -> str:
        if self.state == "ready":
            return f"The neuron database {db} is present; no build needed."
        verb = "Started" if self.state == "started" else "A build is already running:"
        return (f"{verb} the database build in the background (pid {self.pid}); log: {self.log}. "
                f"`python -m precompute status` shows its progress.")


def start(build_argv: list[str], db: Path, work_dir: Path, model: str) -> Launch:
    """Launch ``python -m precompute build *build_argv`` in the background unless ``db`` exists or
    a build of it runs already (see the module docstring)."""
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
            return Launch("running", read_json(record_path(db)).get("pid"), log)
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
        write_json(record_path(db), {"pid": proc.pid, "model": model, "work_dir": str(Path(work_dir).resolve()),
                                      "db": str(db.resolve()), "log": str(log.resolve()), "argv": build_argv,
                                      "started": time.time()})
        return Launch("started", proc.pid, log)
    finally:
        os.close(fd)  # the child keeps its own copy of the locked descriptor
