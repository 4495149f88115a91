"""``MONITOR_HOSTED=1``: the limits of a public demo on a small free host.

Per session: a chat message of at most :data:`MAX_MESSAGE_CHARS` characters (or less when
``MONITOR_MAX_MESSAGE_CHARS`` says so), at most :data:`MAX_NEW_TOKENS` generated tokens per reply
and per steering effect, and experiments only as large as a free CPU finishes in about
:data:`MAX_EXPERIMENT_S` seconds, judged by the experiments page's own pessimistic per-scoring
time. Each limit is applied where the value is chosen (the widget's maximum) and checked again
where it is used, with a message that says what to do. The dashboard writes nothing to disk in
either mode (it opens the database read-only); hosted mode adds no writer.
"""

from __future__ import annotations

import os

MAX_MESSAGE_CHARS = 1000
MAX_NEW_TOKENS = 64
MAX_EXPERIMENT_S = 60.0
UNHOSTED_MAX_NEW_TOKENS = 512  # the chat's own ceiling outside hosted mode


def hosted() -> bool:
    """Whether ``MONITOR_HOSTED`` is set to 1 / true / yes."""
    return os.environ.get("MONITOR_HOSTED", "").strip().lower() in ("1", "true", "yes")


def max_new_tokens(is_hosted: bool, ceiling: int = UNHOSTED_MAX_NEW_TOKENS) -> int:
    """The most tokens one reply (or steering effect) may generate."""
    return min(ceiling, MAX_NEW_TOKENS) if is_hosted else ceiling


def clamp_widget(name: str, limit: int) -> None:
    """Lower a remembered widget value above ``limit`` (before the widget is drawn)."""
    import streamlit as st

    for key in (name, f"w_{name}"):
        value = st.session_state.get(key)
        if isinstance(value, (int, float)) and value > limit:
            st.session_state[key] = limit


def experiment_too_large(scorings: int, seconds_per_scoring: float) -> str | None:
    """A sentence when ``scorings`` would take a free CPU longer than :data:`MAX_EXPERIMENT_S`
    at ``seconds_per_scoring`` (the page's pessimistic rate), else None."""
    cap = int(MAX_EXPERIMENT_S // seconds_per_scoring)
    if scorings <= cap:
        return None
    return (f"This hosted demo runs experiments of at most {cap:,} scorings (about {MAX_EXPERIMENT_S:.0f} s on a free "
            f"CPU); this one has {scorings:,}. Lower the prompts or the random controls, or run it on your own "
            "machine (`python -m engine experiment …`).")
