"""Widgets whose value outlives a page switch.

Streamlit drops a widget's state when a run does not draw it (another page). The value is kept
under ``name`` in plain session state and the widget uses the key ``w_<name>``, re-seeded from
``name`` when it comes back: draw with ``key=widget_key(name, default)``, then call
:func:`remember`; :func:`set_widget` sets one from a callback. :func:`dark_theme` tells
which theme the browser shows.
"""

from __future__ import annotations

from typing import Any

import streamlit as st


def widget_key(name: str, default: Any) -> str:
    """The key of a widget whose value should outlive a page switch.

    Streamlit drops a widget's state when a run does not draw it (another page). The value is
    kept under ``name`` (plain session state) and the widget uses ``w_<name>``, re-seeded from
    ``name`` when it comes back. Call :func:`remember` after drawing the widget.
    """
    wk = f"w_{name}"
    if wk not in st.session_state:
        st.session_state[wk] = st.session_state.get(name, default)
    return wk


def remember(name: str) -> Any:
    value = st.session_state.get(f"w_{name}")
    st.session_state[name] = value
    return value


def set_widget(name: str, value: Any) -> None:
    """Set a :func:`widget_key` widget's value (before it is drawn, or from a callback)."""
    st.session_state[name] = value
    st.session_state[f"w_{name}"] = value


def dark_theme() -> bool:
    """Whether the browser shows Streamlit's dark theme (light when unknown)."""
    theme = getattr(st.context, "theme", None)
    return getattr(theme, "type", None) == "dark"
