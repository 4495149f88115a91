"""Per-session state (``st.session_state``): the conversation and its traces.

Provides the conversation (:func:`messages`, :func:`system_prompt`, :func:`chat_for_model`,
:func:`conversation_key`, :func:`has_conversation`), a small LRU memo of traces keyed on
(model, conversation, target) (:func:`get_trace`), so a trace is computed once per
conversation state and target and reused across reruns, widget changes and pages, a memo for
values derived from a trace (:func:`session_memo`) and the last run's timings (:func:`timings`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

import streamlit as st

DEFAULT_TEMPERATURE = 0.2
DEFAULT_MAX_NEW_TOKENS = 64
ATTRIBUTION_TOP_K = 1000  # (layer, token, neuron) cells kept in attribution mode
TRACE_MEMO_SIZE = 6  # traces kept per session …
TRACE_MEMO_BYTES = 200 * 2**20  # … while they hold at most this much (engine.trace.Trace.nbytes), the newest always


# --------------------------------------------------------------------------- conversation
def messages() -> list[dict]:
    """This session's user/assistant messages (the system prompt is kept apart)."""
    return st.session_state.setdefault("messages", [])


def system_prompt() -> str:
    return str(st.session_state.get("system_prompt", "") or "")


def chat_for_model(msgs: list[dict] | None = None) -> list[dict]:
    """The chat to render: the system prompt (when set) followed by the messages."""
    msgs = messages() if msgs is None else msgs
    sys_prompt = system_prompt().strip()
    head = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
    return head + [{"role": m["role"], "content": m["content"]} for m in msgs]


def conversation_key(chat: list[dict]) -> tuple:
    """A hashable key of a chat: ((role, content), …)."""
    return tuple((m["role"], m["content"]) for m in chat)


def has_conversation() -> bool:
    return any(m["role"] == "user" for m in messages())


# --------------------------------------------------------------------------- traces (per session)
def _memo() -> OrderedDict:
    return st.session_state.setdefault("_trace_memo", OrderedDict())


def trace_key(lm, chat: list[dict], target: int | None, objective: tuple | None = None) -> tuple:
    """(model, conversation, target) and, for a contrastive or answer-level objective, its key."""
    key = (lm.name, conversation_key(chat), None if target is None else int(target))
    return key if objective is None else key + (tuple(objective),)


def get_trace(lm, chat: list[dict], target: int | None = None, distractor: str | None = None,
              answer: tuple[str, str, str] | None = None):
    """The trace of ``chat`` (with attribution toward ``target`` when given), memoised per session.

    The key is (model, conversation, target): mode, threshold, sorting and chart widgets do not
    enter it, so changing them reuses the trace. Attribution is computed with ``logprob``; the
    ``prob`` variant is that times the target probability (see ``engine.trace``), so one trace
    serves both. The last message being the assistant's, the chat is rendered without a new
    generation prompt. ``distractor`` (a token string) makes the attribution contrastive;
    ``answer`` = (answer, versus, stem) attributes to ``L(answer) − L(versus)`` after the last user
    turn (a last assistant reply is left out: the answers stand in its place) instead of a
    target token (:mod:`engine.attribution`). Raises MonitorError (e.g. a chat longer than the
    context, an unknown distractor, answers that tokenise to nothing).
    """
    from engine.trace import run_trace

    okey = ("answer",) + tuple(answer) if answer is not None else ("contrast", distractor) if distractor is not None else None
    key = trace_key(lm, chat, target, okey)
    memo = _memo()
    if key in memo:
        memo.move_to_end(key)
        return memo[key]
    add_prompt = not chat or chat[-1]["role"] != "assistant"
    label = "Tracing the conversation…" if target is None else "Tracing with attribution to the target token…"
    t0 = time.perf_counter()
    with st.spinner(label):
        if answer is not None:
            from engine.attribution import answer_objective

            question = chat if add_prompt else chat[:-1]  # the answers replace the model's reply
            rendered, objective = answer_objective(lm, question, *answer)
            trace = run_trace(lm, question, rendered=rendered, objective=objective)
        else:
            trace = run_trace(lm, chat, target_index=target, attribution="logprob" if target is not None else None,
                              add_generation_prompt=add_prompt, distractor=distractor)
    timings()["trace_s"] = time.perf_counter() - t0
    timings()["trace_kind"] = "activation" if target is None else "attribution"
    memo[key] = trace
    def held() -> int:
        return sum(t.nbytes() for t in memo.values())

    while len(memo) > TRACE_MEMO_SIZE or (len(memo) > 1 and held() > TRACE_MEMO_BYTES):
        memo.popitem(last=False)
    return trace


def session_memo(name: str, key: tuple, compute: Callable[[], Any], size: int = 8) -> Any:
    """A small per-session LRU for values derived from a trace (tables, heatmaps)."""
    store: OrderedDict = st.session_state.setdefault(f"_memo_{name}", OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = compute()
    store[key] = value
    while len(store) > size:
        store.popitem(last=False)
    return value


def timings() -> dict:
    """Wall times of the last generation and trace in this session (read by the benchmark)."""
    return st.session_state.setdefault("_timings", {})
