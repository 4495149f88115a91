"""Test hooks for resumable work: SIGKILL this process, or hold it, at a named step.

``kill_point("PRECOMPUTE_KILL_AT", "embeddings", 3)`` kills the process when the
environment variable ``PRECOMPUTE_KILL_AT`` is ``embeddings:3``. The tests use it to stop a
build or an import exactly between two committed steps, then check that a rerun resumes
without duplicate or missing rows.

The same call holds the process at that step while a file exists, when the sibling variable
(``KILL`` → ``HOLD`` in its name, e.g. ``PRECOMPUTE_HOLD_AT=activations:1``) names the step and
``PRECOMPUTE_HOLD_FILE`` the file: the end-to-end demo test keeps the background build running
until it has seen a live trace, then deletes the file to let the build finish. Unset, both do
nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def kill_point(env_var: str, stage: str, step: int) -> None:
    """SIGKILL the current process if ``$env_var == f"{stage}:{step}"``; wait while the hold file
    exists if the hold variable names this step."""
    here = f"{stage}:{step}"
    spec = os.environ.get(env_var)
    if spec and spec == here:
        os.kill(os.getpid(), signal.SIGKILL)
    hold_var = env_var.replace("KILL", "HOLD")
    if hold_var != env_var and os.environ.get(hold_var) == here:
        hold = os.environ.get(hold_var.rsplit("_AT", 1)[0] + "_FILE")
        while hold and Path(hold).exists():
            time.sleep(0.2)
