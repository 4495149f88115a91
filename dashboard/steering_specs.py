"""This session's steering specs: the list, its ``?steer=`` link, and resolving it against the database.

Provides:

* the list (``st.session_state["steer_specs"]`` of :class:`SpecEntry`): :func:`entries`,
  :func:`current_specs`, :func:`add_spec` (the linter's cluster button uses it), :func:`set_specs`;
* the address: :func:`restore_from_url` (called at the top of every page that steers, so a
  shared link restores the steering) and :func:`sync_url` (writes ``?steer=<specs_to_url>``);
  :func:`parse_specs_text` reads pasted JSON or a link;
* resolution: :func:`selection` (one spec's neurons, memoised per session) and :func:`steering`
  (the enabled specs through :func:`concepts.resolve.resolve`).

The widgets that edit the list are :mod:`dashboard.steering_panel`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import streamlit as st

from dashboard import resources, session
from engine.errors import MonitorError
from engine.specs import ConceptSpec, specs_from_json, specs_from_url, specs_to_url

SPECS = "steer_specs"
URL_PARAM = "steer"


@dataclass
class SpecEntry:
    """One spec in the session's list; ``id`` keys its widgets and never changes."""

    id: int
    spec: ConceptSpec


def entries() -> list[SpecEntry]:
    return st.session_state.setdefault(SPECS, [])


def current_specs(enabled_only: bool = False) -> list[ConceptSpec]:
    return [e.spec for e in entries() if e.spec.enabled or not enabled_only]


def _next_id() -> int:
    n = int(st.session_state.get("_steer_next_id", 0))
    st.session_state["_steer_next_id"] = n + 1
    return n


def mark_changed() -> None:
    """The specs changed by the user's hand: a bad link in the address no longer matters."""
    st.session_state.pop("_steer_bad_url", None)
    st.session_state.pop("_steer_effect", None)


def add_spec(spec: ConceptSpec) -> SpecEntry:
    """Append a spec to this session's steering specs (the linter's cluster button uses this)."""
    entry = SpecEntry(_next_id(), spec)
    entries().append(entry)
    st.session_state["_steer_show_next"] = entry.id  # the neuron list switches to it
    mark_changed()
    return entry


def set_specs(specs) -> None:
    """Replace every spec (a loaded JSON file or link)."""
    st.session_state[SPECS] = [SpecEntry(_next_id(), s) for s in specs]
    st.session_state.pop("_steer_edit", None)
    mark_changed()


def find_entry(entry_id: int) -> SpecEntry | None:
    return next((e for e in entries() if e.id == entry_id), None)


# --------------------------------------------------------------------------- the address (?steer=)
def restore_from_url() -> None:
    """Load the specs a ``?steer=`` link holds (once per new value) and show why one is malformed.

    Called at the top of the pages that steer (chat, steering, experiments), so a link to
    any of them restores the steering. A malformed value stays in the address, with its
    error shown, until the user changes the specs.
    """
    raw = st.query_params.get(URL_PARAM)
    if not raw:
        return
    if raw != st.session_state.get("_steer_url"):
        st.session_state["_steer_url"] = raw
        try:
            specs = specs_from_url(raw)
        except MonitorError as err:
            st.session_state["_steer_bad_url"] = raw
            st.session_state["_steer_url_error"] = str(err)
        else:
            set_specs(specs)
            st.session_state["_steer_url"] = raw
            st.toast(f"Restored {len(specs)} steering spec{'s' * (len(specs) != 1)} from the link.",
                     icon=":material/tune:")
    if raw == st.session_state.get("_steer_bad_url"):
        st.error(f"The `?steer=` part of this address could not be read, so no steering was restored: "
                 f"{st.session_state.get('_steer_url_error')}")


def sync_url() -> None:
    """Write the specs into the address (``?steer=…``), or drop the parameter when there are none."""
    qp = st.query_params
    raw = qp.get(URL_PARAM)
    if raw is not None and raw == st.session_state.get("_steer_bad_url"):
        return  # keep the bad value (and its error) visible until the user changes something
    specs = current_specs()
    if specs:
        text = specs_to_url(specs)
        st.session_state["_steer_url"] = text
        if raw != text:
            qp[URL_PARAM] = text
    elif raw is not None:
        del qp[URL_PARAM]


# --------------------------------------------------------------------------- resolving the session's specs
def selection(res, spec: ConceptSpec):
    """The spec's neurons in the database (:func:`concepts.resolve.select`), memoised per session."""
    from concepts.resolve import select

    key = (res.dbr.stamp, dataclasses.replace(spec, enabled=True))
    return session.session_memo("steer_sel", key, lambda: select(res.db, spec, embed_fn=resources.embed_query),
                                size=48)


@st.cache_resource(show_spinner=False, max_entries=4)
def _quantiles(_db, stamp: tuple):
    from concepts.resolve import steering_quantiles

    return steering_quantiles(_db)


def steering(res, specs=None, strict: bool = False):
    """The session's enabled specs (or ``specs``) resolved by :func:`concepts.resolve.resolve`:
    a :class:`~concepts.resolve.Resolved` (union, quantile tables when a spec strengthens, and
    one problem per spec that could not be resolved and is left out unless ``strict``)."""
    from concepts.resolve import resolve

    return resolve(res.db, current_specs(enabled_only=True) if specs is None else specs, strict=strict,
                   select_fn=lambda spec: selection(res, spec),
                   quantiles_fn=lambda: _quantiles(res.db, res.dbr.stamp))


# --------------------------------------------------------------------------- pasted specs
def parse_specs_text(text: str) -> list[ConceptSpec]:
    """Specs from pasted text: JSON (as exported), a ``c1.…`` link string, or a whole link with ``steer=``."""
    text = (text or "").strip()
    if not text:
        raise MonitorError("Nothing to load: paste the JSON the app exported, or a steering link.")
    if "steer=" in text and not text.startswith(("[", "{")):
        values = parse_qs(urlparse(text).query or text.split("?", 1)[-1]).get(URL_PARAM)
        if not values:
            raise MonitorError("This link has no steer=… value: copy the whole link again.")
        return specs_from_url(values[0])
    if text.startswith("c1."):
        return specs_from_url(text)
    return specs_from_json(text)
