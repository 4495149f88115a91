"""The dashboard's per-process resources, shared by every browser session.

Provides the configuration (:func:`get_config`: ``MONITOR_MODEL``, ``MONITOR_DB``,
``MONITOR_MAX_MESSAGE_CHARS``), the loaded model (:func:`get_model`), the read-only neuron
database (:func:`get_db`), its activation view (:func:`get_view`), a description lookup cache
(:func:`describe`), the query embedder (:func:`embed_query`), and :func:`resources`, which
bundles them for a page as :class:`Resources`.

Everything here is cached with ``st.cache_resource`` and never written by a session. The
engine takes ``LoadedModel.lock`` around every forward pass and ``NeuronDB`` gives each
query its own cursor, so sessions can share them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from engine.errors import MonitorError

DEFAULT_MODEL = "embedded"
DEFAULT_MAX_MESSAGE_CHARS = 4000


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    model: str
    db_path: Path  # the database opened: the full one, or its quick partial one while the full one is missing
    max_message_chars: int
    problems: tuple[str, ...] = ()  # settings that were ignored, as sentences for st.warning
    hosted: bool = False  # MONITOR_HOSTED=1: the public-demo limits of dashboard/hosted.py
    max_new_tokens: int = 512  # the most tokens one reply or steering effect generates
    full_db_path: Path | None = None  # MONITOR_DB or the model's default database (None: db_path)

    @property
    def target(self) -> Path:
        """The full database: the file a background build writes, which pages switch to when it lands."""
        return self.full_db_path or self.db_path

    @property
    def partial(self) -> bool:
        """Whether pages show the quick partial database because the full one is still missing."""
        return self.db_path != self.target


def get_config() -> Config:
    """Read ``MONITOR_MODEL``, ``MONITOR_DB``, ``MONITOR_MAX_MESSAGE_CHARS`` and ``MONITOR_HOSTED`` (cheap; every run).

    The database is ``MONITOR_DB`` or the model's default file when it exists, else its quick partial
    database ``<db>.partial.duckdb`` when that exists (:func:`cache.paths.resolve_db_path`); being
    read on every run, the choice follows the files: no restart when either lands."""
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
    from dashboard import hosted as hosted_mode

    is_hosted = hosted_mode.hosted()
    if is_hosted:
        max_chars = min(max_chars, hosted_mode.MAX_MESSAGE_CHARS)
    from cache.paths import resolve_db_path

    return Config(model=model, db_path=resolve_db_path(db_path), max_message_chars=max_chars, problems=tuple(problems),
                  hosted=is_hosted, max_new_tokens=hosted_mode.max_new_tokens(is_hosted), full_db_path=db_path)


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
    building: bool = False  # a background build of this database is running (error then says its stage)

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
        from cache.build_status import read_status

        status = read_status(cfg.target)
        if status is not None and status.running:
            return DBResource(error=status.sentence(), path=path, building=True)
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
def _view(_db, stamp: tuple):
    from concepts.resolve import activation_view

    return activation_view(_db)


def get_view(res: "Resources"):
    """The database's :class:`engine.activation_view.ActivationView` (floored quantile divisors),
    or None without a usable database."""
    if res.db is None:
        return None
    try:
        return _view(res.db, res.dbr.stamp)
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


def embed_texts(texts: list[str]) -> np.ndarray:
    """Unit-length embeddings [n, d] of a few texts (search explanations), serialised like queries."""
    from cache.embedder import embed

    with _EMBED_LOCK:
        return embed(list(texts))


@dataclass
class Resources:
    """What a page needs: config, model and database (each may carry an error)."""

    cfg: Config
    model: ModelResource
    dbr: DBResource
    mismatch: str | None = None
    extra: dict = field(default_factory=dict)
    browse_only: str | None = None  # why live features are off: the database's model is not one the engine runs

    @property
    def lm(self):
        return self.model.lm

    @property
    def db(self):
        """The database, or None when missing, broken or for another model."""
        return None if self.mismatch else self.dbr.db


def browse_only_note(db) -> str | None:
    """Why live features are off for ``db``, or None when its model is one the engine can run.

    An imported database records the model the engine should load (meta ``engine_model``);
    empty means none can (GPT-2 XL is not a Llama), and meta ``live_note`` says why."""
    if db is None or db.engine_model is not None:
        return None
    note = db.meta.get("live_note") or "the engine cannot run this database's model."
    return f"This database ({db.model_id}) is for browsing only: {note}"


def resources(load_model: bool = True) -> Resources:
    """The page's resources. The model is not loaded for a browse-only database: its
    ``ModelResource.error`` and ``Resources.browse_only`` then say why."""
    cfg = get_config()
    dbr = get_db(cfg)
    browse_only = browse_only_note(dbr.db)
    if browse_only:
        model = ModelResource(error=browse_only)
    else:
        model = get_model(cfg) if load_model else ModelResource(error="not loaded on this page")
    mismatch = db_model_mismatch(model.lm, dbr.db)
    return Resources(cfg, model, dbr, mismatch, browse_only=browse_only)


def import_note(db) -> str | None:
    """One line on where an imported database's rows came from and what it lacks (None if built here)."""
    from cache.provenance import summary

    return summary(db.meta) if db is not None else None
