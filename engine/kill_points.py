"""Test hook for resumable work: SIGKILL this process at a named step.

``kill_point("PRECOMPUTE_KILL_AT", "embeddings", 3)`` kills the process when the
environment variable ``PRECOMPUTE_KILL_AT`` is ``embeddings:3``. The tests use it to stop a
build or an import exactly between two committed steps, then check that a rerun resumes
without duplicate or missing rows. Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal


def kill_point(env_var: str, stage: str, step: int) -> None:
    """SIGKILL the current process if ``$env_var == f"{stage}:{step}"``."""
    spec = os.environ.get(env_var)
    if spec and spec == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
