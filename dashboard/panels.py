"""Extension point of the chat page: panels drawn under the trace.

A panel is a function ``panel(ctx: ChatContext) -> None`` that draws with ``st.*``. Register it
with :func:`register_panel` (at import time of a module that ``pages/chat.py`` imports, or by
appending to :data:`CHAT_PANELS`). Each panel is drawn in its own ``st.expander`` and a
:class:`~engine.errors.MonitorError` it raises becomes ``st.error``, so one broken panel never
takes the page down. The concept linter and semantic steering are panels.

Streamlit runs a collapsed expander's code on every rerun, so an eager panel's cost lands on
every chat turn and widget change. ``lazy=True`` makes the expander track its state
(``on_change="rerun"``) and calls ``render`` only while it is open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd


@dataclass
class ChatContext:
    """What the chat page knows after tracing: shared resources, the chat, and the ranked neurons."""

    res: Any  # dashboard.state.Resources (model, database, config)
    chat: list[dict]  # the rendered chat (system prompt included)
    trace: Any  # engine.trace.Trace of ``chat`` (activations; attributions in attribution mode)
    mode: str  # "Activation" or "Attribution"
    target: int | None  # the selected target token index
    rows: pd.DataFrame  # the neuron table as shown (layer, neuron, polarity, token_index, value, …)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    title: str
    render: Callable[[ChatContext], None]
    expanded: bool = False
    lazy: bool = False  # render only while the expander is open
    order: int = 100  # drawn by ascending order, whatever order the modules were imported in


CHAT_PANELS: list[Panel] = []


def register_panel(title: str, render: Callable[[ChatContext], None], expanded: bool = False,
                   lazy: bool = False, order: int = 100) -> None:
    """Add a panel to the chat page (idempotent per title); panels are kept sorted by ``order``."""
    CHAT_PANELS[:] = [p for p in CHAT_PANELS if p.title != title]
    CHAT_PANELS.append(Panel(title, render, expanded, lazy, order))
    CHAT_PANELS.sort(key=lambda p: p.order)


def panel_key(panel: Panel) -> str:
    return "panel_" + "".join(c if c.isalnum() else "_" for c in panel.title.lower())
