"""Shared dashboard state: configuration, the model and database, the conversation and its traces.

Three lifetimes:

* **per process** (``st.cache_resource``, shared by every browser session): the loaded model
  (:func:`get_model`), the read-only neuron database (:func:`get_db`), its quantile scales
  (:func:`get_scales`) and a description lookup cache (:func:`describe`). The engine takes
  ``LoadedModel.lock`` around every forward pass and ``NeuronDB`` gives each query its own
  cursor, so sessions can share them. Nothing here is ever written by a session.
* **per session** (``st.session_state``): the conversation (:func:`messages`), the system prompt,
  and a small LRU memo of traces keyed on (model, conversation, target) (:func:`get_trace`),
  so a trace is computed once per conversation state and target and reused across reruns,
  widget changes and pages.
* **per run**: everything else.

Configuration comes from the environment (:func:`get_config`): ``MONITOR_MODEL`` (default
``embedded``), ``MONITOR_DB`` (default ``cache.paths.db_path(model)``) and
``MONITOR_MAX_MESSAGE_CHARS`` (default 4000).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import streamlit as st

from engine.errors import MonitorError

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_MODEL = "embedded"
DEFAULT_MAX_MESSAGE_CHARS = 4000
DEFAULT_TEMPERATURE = 0.2
DEFAULT_MAX_NEW_TOKENS = 64
ATTRIBUTION_TOP_K = 1000  # (layer, token, neuron) cells kept in attribution mode
Q_HIGH = 1 - 1e-5  # positive values are divided by this quantile …
Q_LOW = 1e-5  # … negative values by this one
TRACE_MEMO_SIZE = 6  # traces kept per session
PAGE_NEURON = "pages/neuron.py"
PAGE_CHAT = "pages/chat.py"
PAGE_BROWSE = "pages/browse.py"
PAGE_ABOUT = "pages/about.py"


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    model: str
    db_path: Path
    max_message_chars: int
    problems: tuple[str, ...] = ()  # settings that were ignored, as sentences for st.warning


def get_config() -> Config:
    """Read ``MONITOR_MODEL``, ``MONITOR_DB`` and ``MONITOR_MAX_MESSAGE_CHARS`` (cheap; every run)."""
    problems: list[str] = []
    model = os.environ.get("MONITOR_MODEL", "").strip() or DEFAULT_MODEL
    db = os.environ.get("MONITOR_DB", "").strip()
    if db:
        db_path = Path(db).expanduser()
    else:
        from cache.paths import db_path as default_db_path

        db_path = default_db_path(model)
    raw = os.environ.get("MONITOR_MAX_MESSAGE_CHARS", "").strip()
    max_chars = DEFAULT_MAX_MESSAGE_CHARS
    if raw:
        try:
            max_chars = int(raw)
            if max_chars < 1:
                raise ValueError
        except ValueError:
            max_chars = DEFAULT_MAX_MESSAGE_CHARS
            problems.append(f"MONITOR_MAX_MESSAGE_CHARS={raw!r} is not a positive integer; "
                            f"using {DEFAULT_MAX_MESSAGE_CHARS}.")
    return Config(model=model, db_path=db_path, max_message_chars=max_chars, problems=tuple(problems))


def build_command(model: str) -> str:
    from cache.paths import build_command as _build

    return _build(model)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- the model
@dataclass
class ModelResource:
    lm: Any = None  # engine.loader.LoadedModel
    error: str | None = None
    load_s: float = 0.0


@st.cache_resource(show_spinner="Loading the model (once per server)…", max_entries=2)
def _model_resource(name: str) -> ModelResource:
    """Load ``name`` once per process. A failure is cached too: the setting comes from the
    environment, so retrying on every rerun would only repeat a slow failure."""
    from engine.loader import load_model

    t0 = time.perf_counter()
    try:
        lm = load_model(name)
    except MonitorError as err:
        return ModelResource(error=str(err))
    except Exception as err:  # a broken checkpoint must not put a traceback on screen
        return ModelResource(error=f"Could not load model {name!r}: {first_line(err)}")
    return ModelResource(lm=lm, load_s=time.perf_counter() - t0)


def get_model(cfg: Config | None = None) -> ModelResource:
    return _model_resource((cfg or get_config()).model)


# --------------------------------------------------------------------------- the database
@dataclass
class DBResource:
    db: Any = None  # cache.db.NeuronDB
    error: str | None = None
    path: Path | None = None

    @property
    def stamp(self) -> tuple:
        return _stamp(self.path) if self.path else ()


def _stamp(path: Path) -> tuple:
    try:
        st_ = Path(path).stat()
        return (str(path), st_.st_mtime_ns, st_.st_size)
    except OSError:
        return (str(path), None, None)


@st.cache_resource(show_spinner=False, max_entries=4)
def _db_resource(path: str, stamp: tuple):
    """One read-only connection per database file version (a rebuilt file gets a new one).
    Raises MonitorError, which is not cached, so a database built later is picked up."""
    from cache.db import open_database

    return open_database(path, read_only=True)


def get_db(cfg: Config | None = None) -> DBResource:
    cfg = cfg or get_config()
    path = cfg.db_path
    try:
        db = _db_resource(str(path), _stamp(path))
    except MonitorError as err:
        return DBResource(error=str(err), path=path)
    except Exception as err:  # anything else unreadable: same advice
        return DBResource(error=f"{path} could not be opened ({first_line(err)}): delete it and rebuild with "
                                f"`{build_command(cfg.model)}`.", path=path)
    return DBResource(db=db, path=path)


def db_model_mismatch(lm, db) -> str | None:
    """A sentence when the database does not describe the loaded model's neurons, else None."""
    if lm is None or db is None:
        return None
    if (db.n_layers, db.n_neurons) != (lm.n_layers, lm.n_neurons):
        return (f"The database {db.path.name} describes a model with {db.n_layers} layers × {db.n_neurons} neurons "
                f"({db.meta.get('model_id')}), but the loaded model {lm.name} has {lm.n_layers} × {lm.n_neurons}: "
                f"descriptions are not shown. Point MONITOR_DB at this model's database or build it with "
                f"`{build_command(lm.name)}`.")
    return None


def described_layers(db) -> list[int] | None:
    """Layers the database has descriptions for (meta ``described_layers``); None = all."""
    raw = db.meta.get("described_layers") if db is not None else None
    if not raw:
        return None
    try:
        return sorted(int(x) for x in json.loads(raw))
    except (ValueError, TypeError):
        return None


@st.cache_resource(show_spinner=False, max_entries=4)
def _scales(_db, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    from dashboard.ranking import quantile_scales

    return quantile_scales(_db.quantile_table(Q_HIGH), _db.quantile_table(Q_LOW))


def get_scales(res: "Resources") -> tuple[np.ndarray, np.ndarray] | None:
    """(positive, negative) divisors [layers, neurons] from the database's extreme quantiles,
    or None without a usable database."""
    if res.db is None:
        return None
    try:
        return _scales(res.db, res.dbr.stamp)
    except MonitorError:
        return None


class _DescriptionCache:
    """Process-wide (layer, neuron) → both polarities' description row, filled on demand."""

    def __init__(self, max_rows: int = 200_000):
        self.rows: dict[tuple, dict] = {}
        self.lock = threading.Lock()
        self.max_rows = max_rows


@st.cache_resource(show_spinner=False, max_entries=4)
def _description_cache(stamp: tuple) -> _DescriptionCache:
    return _DescriptionCache()


def describe(res: "Resources", pairs) -> pd.DataFrame:
    """``NeuronDB.descriptions_for(pairs)`` (both polarities per (layer, neuron), in order),
    memoised per process; all-null rows without a usable database."""
    from cache.db import DESCRIPTION_COLUMNS

    pairs = [(int(a), int(b)) for a, b in pairs]
    if res.db is None or not pairs:
        return pd.DataFrame({"layer": [p[0] for p in pairs], "neuron": [p[1] for p in pairs]},
                            columns=DESCRIPTION_COLUMNS)
    cache = _description_cache(res.dbr.stamp)
    with cache.lock:
        missing = list(dict.fromkeys(p for p in pairs if p not in cache.rows))
    if missing:
        fetched = res.db.descriptions_for(missing)
        with cache.lock:
            if len(cache.rows) + len(fetched) > cache.max_rows:
                cache.rows.clear()
            for row in fetched.to_dict("records"):
                cache.rows[(int(row["layer"]), int(row["neuron"]))] = row
    with cache.lock:
        rows = [cache.rows.get(p) or {"layer": p[0], "neuron": p[1]} for p in pairs]
    return pd.DataFrame(rows, columns=DESCRIPTION_COLUMNS)


_EMBED_LOCK = threading.Lock()


def embed_query(text: str) -> np.ndarray:
    """The unit-length embedding [d] of a search query (one embedder per process, serialised)."""
    from cache.embedder import embed

    with _EMBED_LOCK:
        return embed([text])[0]


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


def trace_key(lm, chat: list[dict], target: int | None) -> tuple:
    return (lm.name, conversation_key(chat), None if target is None else int(target))


def get_trace(lm, chat: list[dict], target: int | None = None):
    """The trace of ``chat`` (with attribution toward ``target`` when given), memoised per session.

    The key is (model, conversation, target): mode, threshold, sorting and chart widgets do not
    enter it, so changing them reuses the trace. Attribution is computed with ``logprob``; the
    ``prob`` variant is that times the target probability (see ``engine.trace``), so one trace
    serves both. The last message being the assistant's, the chat is rendered without a new
    generation prompt. Raises MonitorError (e.g. a chat longer than the context).
    """
    from engine.trace import run_trace

    key = trace_key(lm, chat, target)
    memo = _memo()
    if key in memo:
        memo.move_to_end(key)
        return memo[key]
    add_prompt = not chat or chat[-1]["role"] != "assistant"
    label = "Tracing the conversation…" if target is None else "Tracing with attribution to the target token…"
    t0 = time.perf_counter()
    with st.spinner(label):
        trace = run_trace(lm, chat, target_index=target, attribution="logprob" if target is not None else None,
                          add_generation_prompt=add_prompt)
    timings()["trace_s"] = time.perf_counter() - t0
    timings()["trace_kind"] = "activation" if target is None else "attribution"
    memo[key] = trace
    while len(memo) > TRACE_MEMO_SIZE:
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


# --------------------------------------------------------------------------- links and small helpers
def neuron_url(layer: int, neuron: int) -> str:
    """A relative link to the neuron page (opens in a new tab from tables)."""
    return f"neuron?layer={int(layer)}&neuron={int(neuron)}"


def neuron_query(layer: int, neuron: int) -> dict:
    return {"layer": str(int(layer)), "neuron": str(int(neuron))}


def dark_theme() -> bool:
    """Whether the browser shows Streamlit's dark theme (light when unknown)."""
    theme = getattr(st.context, "theme", None)
    return getattr(theme, "type", None) == "dark"


def show_token(tok: str) -> str:
    """A token made visible: newlines as ↵, tabs as →, empty as ∅."""
    if tok == "":
        return "∅"
    return tok.replace("\n", "↵").replace("\t", "→")


def token_label(i: int, tok: str) -> str:
    return f"{i}: {show_token(tok)!r}"[: 60]


@dataclass
class Resources:
    """What a page needs: config, model and database (each may carry an error)."""

    cfg: Config
    model: ModelResource
    dbr: DBResource
    mismatch: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def lm(self):
        return self.model.lm

    @property
    def db(self):
        """The database, or None when missing, broken or for another model."""
        return None if self.mismatch else self.dbr.db


def resources(load_model: bool = True) -> Resources:
    cfg = get_config()
    model = get_model(cfg) if load_model else ModelResource(error="not loaded on this page")
    dbr = get_db(cfg)
    mismatch = db_model_mismatch(model.lm, dbr.db)
    return Resources(cfg, model, dbr, mismatch)


# --------------------------------------------------------------------------- widgets that survive page switches
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
