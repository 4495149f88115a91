"""``MONITOR_HOSTED=1``: every public-demo limit is enforced with a clear message, and none applies without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import hosted

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


@pytest.fixture()
def tiny_env(monkeypatch, tiny_llama_dir, tiny_db):
    monkeypatch.setenv("MONITOR_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("MONITOR_DB", str(tiny_db))
    monkeypatch.delenv("MONITOR_MAX_MESSAGE_CHARS", raising=False)
    return monkeypatch


def _chat(at_hosted: bool, env) -> AppTest:
    env.setenv("MONITOR_HOSTED", "1" if at_hosted else "0")
    at = AppTest.from_file(str(APP), default_timeout=300).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_hosted_chat_limits(tiny_env):
    at = _chat(True, tiny_env)
    assert at.slider(key="w_max_new_tokens").max == hosted.MAX_NEW_TOKENS == 64
    assert any("Hosted demo" in c.value for c in at.caption)
    at.chat_input(key="chat_input").set_value("x" * (hosted.MAX_MESSAGE_CHARS + 1)).run()
    assert any("limit is 1,000 (this hosted demo)" in w.value for w in at.warning)
    assert not at.chat_message, "an oversized message must not reach the model"
    # a message within the limit goes through
    at.chat_input(key="chat_input").set_value("x" * hosted.MAX_MESSAGE_CHARS).run()
    assert not at.exception and len(at.chat_message) == 2
    # the same session without hosted mode: the ordinary limits
    at = _chat(False, tiny_env)
    assert at.slider(key="w_max_new_tokens").max == 512
    assert not any("Hosted demo" in c.value for c in at.caption)


def test_hosted_experiment_cap(tiny_env):
    for is_hosted in (True, False):
        tiny_env.setenv("MONITOR_HOSTED", "1" if is_hosted else "0")
        at = AppTest.from_file(str(APP), default_timeout=300)
        at.switch_page("pages/experiments.py")
        at.run()
        assert not at.exception
        at.number_input(key="w_exp_pairs").set_value(30).run()  # 60 prompts × 1 condition: under a minute
        assert not any("hosted demo runs experiments" in e.value for e in at.error)
        assert not at.button(key="exp_run").disabled
        at.number_input(key="w_exp_pairs").set_value(100).run()  # 200 scorings × 0.5 s: over a minute
        msgs = [e.value for e in at.error if "hosted demo runs experiments" in e.value]
        if is_hosted:
            assert msgs and "at most 120 scorings" in msgs[0] and "this one has 200" in msgs[0]
            assert at.button(key="exp_run").disabled
        else:
            assert not msgs and not at.button(key="exp_run").disabled


def test_experiment_cap_formula():
    """cap = ⌊60 s / pessimistic seconds per scoring⌋, checked at the boundary."""
    assert hosted.experiment_too_large(120, 0.5) is None
    assert "at most 120 scorings" in hosted.experiment_too_large(121, 0.5)
    assert hosted.experiment_too_large(40, 1.5) is None and hosted.experiment_too_large(41, 1.5)
