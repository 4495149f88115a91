"""End to end in a real browser: the real Streamlit server, Debian's chromium driven by Playwright.

Starts ``streamlit run dashboard/app.py`` on a free port against the ``embedded_db`` fixture,
chats, waits for the trace table, clicks a token to make it the target, opens the neuron
page from the trace (same session, so it shows the live activation) and saves screenshots
under ``test-output/``. Then two more browser contexts chat at the same time against the
one server (one model, one read-only database) and each sees only its own conversation.

A third test opens a Transluce NeuronDB imported from a real PostgreSQL (``tiny_transluce``):
its neuron page shows the text-only exemplars and says what the import lacks, and its search
finds the re-embedded summaries.

Nothing is skipped: without ``/usr/bin/chromium`` the test fails and says to run ``make browser``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

APP = ROOT / "dashboard" / "app.py"
OUT = ROOT / "test-output"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
STARTUP_S = 180
TURN_MS = 240_000  # one chat turn: the first session also loads the model

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = STARTUP_S, tick=None) -> None:
    """Poll the server at ``url`` until it answers; ``proc`` (its process, or ``make demo``'s) exiting
    or ``timeout`` passing fails with the tail of ``log``. ``tick`` is called between polls."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server's process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"the server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
        if tick is not None:
            tick()
        time.sleep(0.5)


def stop_demo(proc: subprocess.Popen, db: Path) -> None:
    """Stop ``make demo`` (``proc``, started in its own session) and, if it still runs, the
    background build of ``db`` it launched (which ``make demo`` detaches on purpose)."""
    import signal

    from cache.build_status import is_locked, read_status

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    record = read_status(db) if db.parent.exists() else None
    pid = (record.launched or {}).get("pid") if record is not None else None
    if pid and is_locked(db):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def streamlit_server(env_overrides: dict, log_dir: Path):
    """The real Streamlit server on a free port with ``env_overrides``; yields its URL."""
    if not CHROMIUM.exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}: run `make browser` "
                    "(apt-get install chromium) and rerun the tests.")
    port = _free_port()
    log = log_dir / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **env_overrides}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(embedded_db, tmp_path_factory):
    with streamlit_server({"MONITOR_MODEL": "embedded", "MONITOR_DB": str(embedded_db)},
                          tmp_path_factory.mktemp("streamlit")) as url:
        yield url


@pytest.fixture(scope="module")
def imported_server(tiny_transluce, tmp_path_factory):
    """The dashboard on a Transluce NeuronDB imported from a real PostgreSQL (the tiny Llama's)."""
    path, _rows, model = tiny_transluce
    with streamlit_server({"MONITOR_MODEL": model, "MONITOR_DB": str(path)},
                          tmp_path_factory.mktemp("streamlit-imported")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}: run `make browser`.")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open_chat(context, url: str):
    page = context.new_page()
    page.set_default_timeout(TURN_MS)
    page.goto(url + "/")
    page.get_by_placeholder("Message the model…").wait_for()
    # few, greedy tokens: temperature 0, max new tokens 8 (the sliders' range inputs, by keyboard)
    _set_slider(page, "Temperature", 0, "0")
    _set_slider(page, "Max new tokens", 7, "8")
    return page


def _set_slider(page, label: str, right: int, expect: str) -> None:
    thumb = page.locator(f'[data-testid="stSidebar"] input[type="range"][aria-label="{label}"]')
    thumb.focus()
    thumb.press("Home")
    for _ in range(right):
        thumb.press("ArrowRight")
    page.wait_for_function("([label, v]) => Number(document.querySelector("
                           "`[data-testid=stSidebar] input[type=range][aria-label='${label}']`).value) === Number(v)",
                           arg=[label, expect])
    page.wait_for_timeout(700)  # let the rerun of the last key finish


def _send(page, text: str) -> None:
    box = page.get_by_placeholder("Message the model…")
    box.fill(text)
    box.press("Enter")


def _wait_for_trace(page, text: str) -> None:
    page.locator('[data-testid="stChatMessage"]').filter(has_text=text).first.wait_for()
    page.get_by_text("Inspect a neuron", exact=True).wait_for()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    page.get_by_text("neurons reach").wait_for()
    page.locator(TARGET_INPUT).wait_for()  # drawn last, at the top of the page
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TURN_MS)


TARGET_INPUT = '.st-key-w_target input[role="combobox"]'


def _target_label(page) -> str:
    return page.locator(TARGET_INPUT).input_value().strip()


def test_chat_trace_and_neuron_page_in_a_real_browser(server, browser):
    OUT.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1440, "height": 2200})
    page = _open_chat(context, server)
    _send(page, "Which is bigger: 9.8 or 9.11?")
    _wait_for_trace(page, "Which is bigger")
    messages = page.locator('[data-testid="stChatMessage"]')
    assert messages.count() == 2
    assert messages.nth(1).inner_text().strip()
    note = page.get_by_text("neurons reach").first.inner_text()
    assert int(note.split()[0].replace(",", "")) > 0
    assert page.locator('[data-testid="stVegaLiteChart"]').count() >= 3  # tokens, heatmap, top neurons

    # a click on token 1 in the token chart makes it the target
    before = _target_label(page)
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    chart.scroll_into_view_if_needed()
    token_1 = chart.locator("g.mark-rect path").nth(1).bounding_box()  # the boxes, one per token, in order
    page.mouse.click(token_1["x"] + token_1["width"] / 2, token_1["y"] + token_1["height"] / 2)
    page.wait_for_function("(sel) => document.querySelector(sel).value.startsWith('1: ')", arg=TARGET_INPUT)
    assert _target_label(page).startswith("1: ") and not before.startswith("1: ")
    page.screenshot(path=str(OUT / "e2e-chat-trace.png"), full_page=True)

    # only described neurons, so the inspected one (the strongest) has descriptions to show
    page.get_by_text("Only described neurons").click()
    page.wait_for_timeout(500)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
    page.locator(TARGET_INPUT).wait_for()

    # open the inspected neuron's page from the trace, in the same session
    link = page.get_by_role("link", name="Open neuron L")
    label = link.inner_text()
    layer, neuron = label.split("L", 1)[1].split("/N")
    link.click()
    page.wait_for_url(f"**/neuron?layer={layer}&neuron={neuron.strip()}")
    page.get_by_text(f"Layer {layer} · neuron {neuron.strip()}").wait_for()
    page.get_by_text("On the current conversation", exact=True).wait_for()
    page.get_by_text("most extreme token (token 0 excluded)").wait_for()
    page.get_by_text("Exemplars", exact=True).wait_for()
    assert page.get_by_text("explainer").count() >= 1  # a described neuron: its descriptions' metrics
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
    page.wait_for_timeout(1500)  # charts finish drawing
    assert page.locator(".mon-toks").count() > 1  # the live conversation and the exemplars, highlighted
    page.screenshot(path=str(OUT / "e2e-neuron-page.png"), full_page=True)
    assert (OUT / "e2e-neuron-page.png").stat().st_size > 10_000
    context.close()


def test_two_browser_sessions_at_once(server, browser):
    a = browser.new_context(viewport={"width": 1280, "height": 1400})
    b = browser.new_context(viewport={"width": 1280, "height": 1400})
    pa, pb = _open_chat(a, server), _open_chat(b, server)
    _send(pa, "Tell me about apples.")
    _send(pb, "Tell me about bananas.")  # both turns run on the server at the same time
    _wait_for_trace(pa, "apples")
    _wait_for_trace(pb, "bananas")
    text_a = pa.locator('[data-testid="stChatMessage"]').first.inner_text()
    text_b = pb.locator('[data-testid="stChatMessage"]').first.inner_text()
    assert "apples" in text_a and "bananas" not in text_a
    assert "bananas" in text_b and "apples" not in text_b
    assert pa.locator('[data-testid="stChatMessage"]').count() == 2
    assert pb.locator('[data-testid="stChatMessage"]').count() == 2
    assert not pa.locator('[data-testid="stException"]').count() and not pb.locator('[data-testid="stException"]').count()
    a.close()
    b.close()


def _settled(page) -> None:
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TURN_MS)


def test_imported_database_neuron_page_and_search_in_a_real_browser(imported_server, browser, tiny_transluce):
    OUT.mkdir(exist_ok=True)
    _path, rows, model = tiny_transluce
    context = browser.new_context(viewport={"width": 1440, "height": 2200})
    page = context.new_page()
    page.set_default_timeout(TURN_MS)
    page.goto(imported_server + "/neuron?layer=1&neuron=5")
    page.get_by_text("Layer 1 · neuron 5").wait_for()
    page.get_by_text("Imported from Transluce NeuronDB", exact=False).first.wait_for()
    page.get_by_text("No per-token activations in this database", exact=False).first.wait_for()
    _settled(page)
    page.wait_for_timeout(1000)
    plain = page.locator(".mon-plain")
    expected = [r[3] for r in rows["exemplars"] if r[1] == f"{model}_1_5_None"]
    assert plain.count() == len(expected) == 6
    shown = "\n".join(plain.nth(i).inner_text() for i in range(plain.count()))
    assert all(t.splitlines()[0] in shown for t in expected)
    assert page.get_by_text("explainer").count() >= 1
    assert not page.locator('[data-testid="stException"]').count()
    page.screenshot(path=str(OUT / "e2e-imported-neuron.png"), full_page=True)

    page.goto(imported_server + "/browse?q=Bible%20verses")
    page.get_by_text("results for", exact=False).first.wait_for()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    _settled(page)
    assert "50" in page.get_by_text("results for", exact=False).first.inner_text()
    assert page.get_by_text("Imported from Transluce NeuronDB", exact=False).count() >= 1
    assert not page.locator('[data-testid="stException"]').count()
    page.screenshot(path=str(OUT / "e2e-imported-browse.png"), full_page=True)
    assert (OUT / "e2e-imported-browse.png").stat().st_size > 10_000
    context.close()
