"""``make demo`` from a clean checkout, end to end in a real browser (issue 10).

A copy of this working tree (tracked and untracked, not ignored, files: what ``git clone`` of the
commit would hold, with no ``data/``) gets the project's virtual environment linked in (the
packages "already in the local cache") and runs the README's own command, ``make demo``, with the
tiny random Llama and a small corpus (``BUILD_ARGS``). Its two processes are the ones a user gets:
the background database build (a quick partial database, then the full one) and the Streamlit
server. In Debian's chromium the test

1. chats and sees a live trace while the build still runs and no database exists (the build is
   held at its first activation batch through ``PRECOMPUTE_HOLD_AT``, so "before the build
   finishes" is certain rather than a race), saying that the database is being built and no descriptions are shown yet;
2. lets the build go on and, in the same browser session with no restart and no reload, sees the
   inspected neuron's descriptions appear once the database lands.

A second ``make demo`` while the build runs starts no second build (the background tests check
the kill-and-resume half with the same launcher).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_e2e_dashboard import (OUT, _free_port, _open_chat, _send, _wait_for_trace, browser,  # noqa: F401
                                      stop_demo, wait_for_health)

ROOT = Path(__file__).resolve().parents[1]
BUILD_ARGS = "--profile tiny --n-sequences 48 --batch-size 8 --partial-n-sequences 24 --quiet"
BUILD_S = 600

pytestmark = pytest.mark.slow


def _clean_checkout(dest: Path) -> Path:
    """The working tree's files as a clone would have them (no ``data/``, no ``.venv``), plus a link
    to this project's virtual environment."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    assert not (dest / "data").exists()
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def test_make_demo_from_a_clean_checkout_traces_before_the_build_and_shows_descriptions_after(
        tiny_llama_dir, tmp_path, browser):  # noqa: F811
    from cache.build_status import is_locked, read_status

    clone = _clean_checkout(tmp_path / "clone")
    hold = tmp_path / "hold-the-build"
    hold.touch()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONITOR_", "PRECOMPUTE_", "STREAMLIT_"))}
    env.update({"PRECOMPUTE_HOLD_AT": "activations:1", "PRECOMPUTE_HOLD_FILE": str(hold),
                "STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
                "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"})
    make = ["make", "demo", f"MODEL={tiny_llama_dir}", f"PORT={port}", f"BUILD_ARGS={BUILD_ARGS}"]
    log = tmp_path / "make-demo.log"
    db = clone / "data" / f"{Path(tiny_llama_dir).name.lower()}.duckdb"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(make, cwd=clone, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(url, proc, log)
        assert "Started the database build in the background" in log.read_text()
        assert is_locked(db), "make demo started no background build"

        # a second `make demo` while the build runs starts no second build (only a second server)
        port2 = _free_port()
        log2 = tmp_path / "make-demo-2.log"
        with open(log2, "wb") as fh:
            proc2 = subprocess.Popen([*make[:-2], f"PORT={port2}", make[-1]], cwd=clone, env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_health(f"http://127.0.0.1:{port2}", proc2, log2)
        finally:
            os.killpg(proc2.pid, signal.SIGTERM)
            proc2.wait(timeout=30)
        assert "already running" in log2.read_text() and "Started" not in log2.read_text(), log2.read_text()[-2000:]

        # 1. a live trace while the build is held and no database exists
        context = browser.new_context(viewport={"width": 1440, "height": 2000})
        page = _open_chat(context, url)
        _send(page, "Which is bigger: 9.8 or 9.11?")
        _wait_for_trace(page, "Which is bigger")
        status = read_status(db)
        assert status is not None and status.running and not db.exists()
        assert not (clone / "data" / f"{db.stem}.partial.duckdb").exists()
        OUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUT / "e2e-demo-before-build.png"), full_page=True)
        assert page.get_by_text("is being built in the background: stage").count() >= 1  # banner and sidebar
        assert page.get_by_text("no descriptions are shown").count() >= 1

        # 2. the build goes on; descriptions appear in this session, no restart, no reload
        hold.unlink()
        page.get_by_text(re.compile(r"· (score -?\d|unscored)")).first.wait_for(timeout=BUILD_S * 1000)
        assert db.exists() or (clone / "data" / f"{db.stem}.partial.duckdb").exists()
        deadline = time.time() + BUILD_S
        while is_locked(db):  # the chain ends with the full database, the partial one replaced
            assert time.time() < deadline, f"the background build did not end within {BUILD_S} s"
            time.sleep(0.5)
        assert db.exists() and read_status(db).sentence() == f"The neuron database {db.name} is ready."
        page.screenshot(path=str(OUT / "e2e-demo-after-build.png"), full_page=True)
        assert proc.poll() is None, "the dashboard stopped while the build landed"
        context.close()
    finally:
        hold.unlink(missing_ok=True)
        stop_demo(proc, db)
