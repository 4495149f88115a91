"""Open a neuron database and query it: semantic and keyword search, neuron lookup, quantiles.

:func:`open_database` validates the file and turns every way it can be unusable (missing,
interrupted build, not DuckDB, corrupt, someone else's DuckDB, old schema, locked) into a
:class:`~engine.errors.MonitorError` that names the rebuild command.

:class:`NeuronDB` holds one DuckDB connection; every method runs on its own
``conn.cursor()``, so one NeuronDB may be shared by threads (the dashboard's sessions).
All SQL takes user values as ``?`` parameters; only fixed fragments are concatenated.

Semantic search runs in NumPy over a cached matrix (:mod:`cache.vector_index`); result
rows are then fetched by DuckDB rowid (:mod:`cache.key_map`). Both caches load on first
use and assume the file does not change while open, which holds for ``read_only=True``
(the default; ``read_only=False`` is for maintenance, not for querying while writing).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import duckdb
import numpy as np
import pandas as pd

from engine.errors import MonitorError

from .codec import decode_acts, decode_unit_rows
from .key_map import KeyMap
from .paths import EMBEDDED_NAME, build_command, db_path, model_for_slug, tmp_path
from .schema import ABSENT_IN, COLUMNS, READABLE_VERSIONS, READER_META, SCHEMA_VERSION, TABLES, VEC_ELEMENT_TYPES
from .vector_index import EmbeddingIndex

RESULT_COLUMNS = ["layer", "neuron", "polarity", "description", "summary", "score", "similarity", "top_exemplar"]
DESCRIPTION_COLUMNS = ["layer", "neuron", "description_pos", "summary_pos", "score_pos",
                       "description_neg", "summary_neg", "score_neg"]

# LIKE escape character for keyword search: the user's text is matched literally.
_ESC = "\\"


def open_database(path: str | os.PathLike | None = None, read_only: bool = True, *,
                  model: str = EMBEDDED_NAME) -> "NeuronDB":
    """Open and validate a neuron database (``path``, or ``db_path(model)`` when None)."""
    path = Path(path) if path is not None else db_path(model)
    if not path.is_file():
        rebuild = _rebuild(path)
        if tmp_path(path).exists():
            if _is_import(tmp_path(path)):
                raise MonitorError(f"The import into {path.name} did not finish ({tmp_path(path).name} is left over "
                                   f"in {path.parent}): unless it is still running, re-run the same `python -m cache "
                                   "import …` command to resume it.")
            raise MonitorError(f"The neuron database build did not finish ({tmp_path(path).name} is left over "
                               f"in {path.parent}): unless a build is still running, re-run `{rebuild}` "
                               "to resume it.")
        raise MonitorError(f"No neuron database at {path}: build it with `{rebuild}`.")
    try:
        conn = duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "lock" in first.lower():
            raise MonitorError(f"{path} is in use by another process (is a build still writing it?): "
                               f"wait for it to finish, or stop it and re-run `{_rebuild(path)}`.") from err
        raise MonitorError(f"{path} is not a readable DuckDB file ({first}): delete it and rebuild with "
                           f"`{_rebuild(path)}`.") from err
    try:
        meta = _validate(conn, path)
    except BaseException:
        conn.close()
        raise
    return NeuronDB(path, conn, meta)


def _is_import(tmp: Path) -> bool:
    """Whether an unfinished ``.tmp`` is an import (it has the importers' progress table)."""
    try:
        with duckdb.connect(str(tmp), read_only=True) as conn:
            return bool(conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = '_import_progress'")
                        .fetchall()[0][0])
    except duckdb.Error:  # locked by the running import, or unreadable: say the general thing
        return False


def _rebuild(path: Path, meta: dict[str, str] | None = None) -> str:
    """The rebuild command for ``path``: the recorded import command of an imported database,
    else the build command for the model from meta when readable, else from the file name."""
    meta = meta or {}
    if meta.get("import_command"):
        return meta["import_command"]
    slug = meta.get("model_slug") or Path(path).name.split(".duckdb")[0]
    return build_command(model_for_slug(slug, meta.get("model_id")))


def _validate(conn: duckdb.DuckDBPyConnection, path: Path) -> dict[str, str]:
    """Check tables, meta keys, schema version and the vector type; return the meta dict."""
    try:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main'").fetchall()}
        missing = [t for t in TABLES if t not in tables and t not in ABSENT_IN.get("1", ())]
        if missing:
            raise MonitorError(f"{path} is a DuckDB file but not a neuron database (missing tables: "
                               f"{', '.join(missing)}): move it away and build one with `{_rebuild(path)}`.")
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta").fetchall()}
        vec_type = conn.execute("SELECT data_type FROM duckdb_columns() WHERE database_name = current_database() "
                                "AND table_name = 'embeddings' AND column_name = 'vec'").fetchall()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0]
        raise MonitorError(f"{path} is damaged ({first}): delete it and rebuild with `{_rebuild(path)}`.") from err
    rebuild = _rebuild(path, meta)
    missing = [k for k in READER_META if k not in meta]
    if missing:
        raise MonitorError(f"{path} is not a neuron database this code can read (meta lacks "
                           f"{', '.join(missing)}): rebuild it with `{rebuild}`.")
    version = meta["schema_version"]
    if version not in READABLE_VERSIONS or (version != SCHEMA_VERSION and not _read_only(conn)):
        raise MonitorError(f"{path} has schema version {version} but this code reads versions "
                           f"{', '.join(READABLE_VERSIONS)} (and writes {SCHEMA_VERSION}): rebuild it with `{rebuild}`.")
    missing = [t for t in TABLES if t not in tables and t not in ABSENT_IN.get(version, ())]
    if missing:
        raise MonitorError(f"{path} is damaged (schema version {version} but no {', '.join(missing)} table): "
                           f"rebuild it with `{rebuild}`.")
    try:
        n_layers, n_neurons, dim = (int(meta[k]) for k in ("n_layers", "n_neurons", "embedding_dim"))
    except ValueError as err:
        raise MonitorError(f"{path} has unreadable meta ({err}): rebuild it with `{rebuild}`.") from err
    if min(n_layers, n_neurons, dim) <= 0 or not vec_type or vec_type[0][0] not in {f"{t}[{dim}]" for t in VEC_ELEMENT_TYPES}:
        raise MonitorError(f"{path} is inconsistent (embeddings.vec is {vec_type[0][0] if vec_type else 'missing'}, "
                           f"meta embedding_dim is {dim}): rebuild it with `{rebuild}`.")
    return meta


def _read_only(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``conn`` was opened read-only (an old-version file may only be read)."""
    return bool(conn.execute("SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()")
                .fetchall()[0][0])


class NeuronDB:
    """A validated, open neuron database. Use :func:`open_database` to get one."""

    def __init__(self, path: Path, conn: duckdb.DuckDBPyConnection, meta: dict[str, str]):
        self.path = path
        self._conn = conn
        self.meta: dict[str, str] = meta
        self.n_layers = int(meta["n_layers"])
        self.n_neurons = int(meta["n_neurons"])
        self.embedding_dim = int(meta["embedding_dim"])
        self._lock = threading.Lock()
        self._keys: KeyMap | None = None
        self._index: EmbeddingIndex | None = None
        self._quantiles: dict[float, np.ndarray] = {}
        self._stored_qs: list[float] | None = None
        self.version = meta["schema_version"]
        self.tables = tuple(t for t in TABLES if t not in ABSENT_IN.get(self.version, ()))
        self._scorer_values: dict[str, np.ndarray] = {}

    @property
    def has_scores(self) -> bool:
        """Whether the file has the scores table (a version-1 file has not)."""
        return "scores" in self.tables

    # ------------------------------------------------------------------ basics
    def __enter__(self) -> "NeuronDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NeuronDB({str(self.path)!r}, {self.n_layers}×{self.n_neurons})"

    def close(self) -> None:
        self._conn.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A fresh cursor for the calling thread (close it, or use it as a context manager)."""
        return self._conn.cursor()

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def rebuild_command(self) -> str:
        return _rebuild(self.path, self.meta)

    @property
    def imported(self) -> bool:
        """Whether the rows came from another publisher's database (meta ``source``)."""
        return "source" in self.meta

    @property
    def engine_model(self) -> str | None:
        """The ``--model`` the engine loads for live traces: meta ``engine_model`` (``''`` in the
        file means none can, e.g. GPT-2 XL: then None), else the built model's ``model_id``."""
        value = self.meta.get("engine_model", self.meta["model_id"])
        return value or None

    @property
    def partial(self) -> bool:
        """Whether this is a quick partial database (meta ``partial``; :mod:`precompute.quick`), built
        from a slice of the corpus with some layers described, while the full one is built."""
        return self.meta.get("partial") == "true"

    @property
    def described_layers(self) -> list[int] | None:
        """The layers with descriptions (meta ``described_layers``); None when all are (or unknown)."""
        try:
            layers = json.loads(self.meta.get("described_layers") or "null")
            return None if layers is None else sorted(int(x) for x in layers)
        except (ValueError, TypeError):
            return None

    def undescribed_note(self, layer: int) -> str | None:
        """One line when ``layer`` has no descriptions in this database, else None."""
        described = self.described_layers
        if described is None or int(layer) in described:
            return None
        covered = ", ".join(map(str, described)) or "none"
        if self.partial:
            return (f"Layer {int(layer)} is not in this partial database (it describes layers {covered}, from "
                    f"{self.meta.get('n_sequences', '?')} sequences): its descriptions come with the full database, "
                    "which the background build is writing.")
        return f"Layer {int(layer)} is not described in this database (described layers: {covered})."

    def counts(self) -> dict[str, int]:
        """Rows per table (a version-1 file has no scores table and leaves it out)."""
        with self.cursor() as cur:
            return {t: int(cur.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]) for t in self.tables}

    @property
    def keys(self) -> KeyMap:
        """Rowids of every key's description and top exemplar, loaded on first use (thread-safe)."""
        if self._keys is None:
            with self._lock:
                if self._keys is None:
                    with self.cursor() as cur:
                        self._keys = KeyMap.load(cur, self.n_layers, self.n_neurons)
        return self._keys

    @property
    def index(self) -> EmbeddingIndex:
        """The in-RAM embedding matrix, loaded on first use (thread-safe)."""
        if self._index is None:
            keys = self.keys
            with self._lock:
                if self._index is None:
                    with self.cursor() as cur:
                        self._index = EmbeddingIndex.load(cur, keys, self.embedding_dim)
        return self._index

    # ------------------------------------------------------------------ checks
    def check_neuron(self, layer: int, neuron: int) -> tuple[int, int]:
        """(layer, neuron) as ints, or MonitorError naming the valid range."""
        layer, neuron = int(layer), int(neuron)
        if not 0 <= layer < self.n_layers:
            raise MonitorError(f"Layer {layer} is out of range: this database has layers 0..{self.n_layers - 1}.")
        if not 0 <= neuron < self.n_neurons:
            raise MonitorError(f"Neuron {neuron} is out of range: each layer has neurons 0..{self.n_neurons - 1}.")
        return layer, neuron

    def _check_filters(self, k: int, layer_range, polarity, min_score) -> tuple[int, tuple[int, int] | None,
                                                                                int | None, float | None]:
        k = int(k)
        if k < 1:
            raise MonitorError(f"k must be at least 1, got {k}.")
        if layer_range is not None:
            lo, hi = (int(x) for x in layer_range)
            if not 0 <= lo <= hi < self.n_layers:
                raise MonitorError(f"Layer range {lo}-{hi} is invalid: use lo-hi with 0 <= lo <= hi <= "
                                   f"{self.n_layers - 1}.")
            layer_range = (lo, hi)
        if polarity is not None:
            polarity = int(polarity)
            if polarity not in (1, -1):
                raise MonitorError(f"Polarity must be 1 or -1, got {polarity}.")
        if min_score is not None:
            min_score = float(min_score)
            if not np.isfinite(min_score):
                raise MonitorError("min_score must be a finite number.")
        return k, layer_range, polarity, min_score

    # ------------------------------------------------------------------ search
    def semantic_search(self, query_vec: np.ndarray, k: int = 20, layer_range: tuple[int, int] | None = None,
                        polarity: int | None = None, min_score: float | None = None,
                        keyword: str | None = None, scorer: str | None = None) -> pd.DataFrame:
        """The k (neuron, polarity) descriptions most similar to ``query_vec`` [d].

        similarity = cos(vec, q) = vec · q / ‖q‖ (stored vecs are unit length). Filters
        (inclusive ``layer_range`` (lo, hi), ``polarity`` ±1, ``score >= min_score``, literal
        case-insensitive ``keyword`` in text or summary) select candidates before the top-k;
        with ``scorer``, ``min_score`` applies to that scorer's value (see :meth:`scorers`)
        instead of the main score.
        Columns: :data:`RESULT_COLUMNS`, most similar first.
        """
        k, layer_range, polarity, min_score = self._check_filters(k, layer_range, polarity, min_score)
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)  # [d]
        if q.shape[0] != self.embedding_dim:
            raise MonitorError(f"The query embedding has {q.shape[0]} dimensions but this database has "
                               f"{self.embedding_dim} ({self.meta['embedding_model']}): embed the query with "
                               "that model (set MONITOR_EMBEDDING_MODEL).")
        if not np.all(np.isfinite(q)) or not np.any(q):
            raise MonitorError("The query embedding is zero or not finite: search for some text.")
        index = self.index
        codes = None
        if keyword is not None:
            with self.cursor() as cur:
                found = cur.execute("SELECT layer, neuron, polarity FROM descriptions WHERE "
                                    + _keyword_clause(), _keyword_params(keyword)).fetchnumpy()
            codes, ok = self.keys.codes(found["layer"], found["neuron"], found["polarity"])
            codes = codes[ok]
        score = None if scorer is None or min_score is None else self.scorer_values(scorer)[index.codes]
        mask = index.mask(layer_range, polarity, min_score, codes, score=score)
        top, sims = index.top_k(q, k, mask)
        return self._result_rows(index.layer[top], index.neuron[top], index.polarity[top], sims)

    def keyword_search(self, text: str, k: int = 50, layer_range: tuple[int, int] | None = None,
                       polarity: int | None = None, min_score: float | None = None,
                       scorer: str | None = None) -> pd.DataFrame:
        """Descriptions whose text or summary contains ``text`` (case-insensitive, literal: ``%``,
        ``_`` and quotes match themselves), best score first. Columns as :meth:`semantic_search`,
        similarity NULL."""
        k, layer_range, polarity, min_score = self._check_filters(k, layer_range, polarity, min_score)
        where, params = [_keyword_clause()], _keyword_params(text)
        if layer_range is not None:
            where.append("layer BETWEEN ? AND ?")
            params += list(layer_range)
        if polarity is not None:
            where.append("polarity = ?")
            params.append(polarity)
        if min_score is not None and scorer is not None:
            self._check_scorer(scorer)
            where.append("(layer, neuron, polarity) IN (SELECT layer, neuron, polarity FROM scores "
                         "WHERE scorer = ? AND value >= ?)")
            params += [scorer, min_score]
        elif min_score is not None:
            where.append("score >= ?")
            params.append(min_score)
        with self.cursor() as cur:
            keys = cur.execute("SELECT layer, neuron, polarity FROM descriptions WHERE " + " AND ".join(where)
                               + " ORDER BY score DESC NULLS LAST, layer, neuron, polarity DESC LIMIT ?",
                               params + [k]).fetchnumpy()
        return self._result_rows(keys["layer"], keys["neuron"], keys["polarity"], None)

    def _result_rows(self, layer: np.ndarray, neuron: np.ndarray, polarity: np.ndarray,
                     similarity: np.ndarray | None) -> pd.DataFrame:
        """Description and top exemplar text of the given keys [m], in the given order, fetched
        by rowid (see :mod:`cache.key_map`)."""
        keys = self.keys
        codes, ok = keys.codes(layer, neuron, polarity)
        desc_rowid = np.where(ok, keys.desc_rowid[codes], -1)  # [m]
        seq_rowid = np.where(ok, keys.top_seq_rowid[codes], -1)  # [m]
        with self.cursor() as cur:
            desc = _by_rowid(cur, "SELECT rowid, text, summary, score FROM descriptions", desc_rowid)
            seqs = _by_rowid(cur, "SELECT rowid, text FROM sequences", seq_rowid)
        df = pd.DataFrame({
            "layer": np.asarray(layer, np.int64), "neuron": np.asarray(neuron, np.int64),
            "polarity": np.asarray(polarity, np.int64),
            "description": desc["text"].reindex(desc_rowid).to_numpy(object),
            "summary": desc["summary"].reindex(desc_rowid).to_numpy(object),
            "score": desc["score"].reindex(desc_rowid).to_numpy(np.float64, na_value=np.nan),
            "similarity": np.full(len(codes), np.nan) if similarity is None else np.asarray(similarity, np.float64),
            "top_exemplar": seqs["text"].reindex(seq_rowid).to_numpy(object),
        })
        return _typed(df[RESULT_COLUMNS])

    # ------------------------------------------------------------------ lookups
    def neuron(self, layer: int, neuron: int) -> dict:
        """Everything stored about one neuron.

        Returns {layer, neuron, promotes, suppresses, descriptions: {±1: {text, summary, score,
        explainer, scorer}}, quantiles: {q: value}, exemplars: [{polarity, split, rank, seq_id,
        source, max_act, text, tokens, acts}]}; acts are decoded as ``code · scale / 127``, or None
        when the exemplar has none (an import of text and peak value only, whose tokens are []).
        ``scorer`` names what ``score`` is (meta ``scorer`` for a version-1 file). Exemplars come
        positive first, then negative, then random; train and source before test; by rank.
        """
        layer, neuron = self.check_neuron(layer, neuron)
        key = [layer, neuron]
        with self.cursor() as cur:
            out = cur.execute("SELECT promotes, suppresses FROM neurons WHERE layer = ? AND neuron = ?", key).fetchall()
            scorer = "score_scorer" if self.has_scores else "CAST(NULL AS VARCHAR)"
            descs = cur.execute(f"SELECT polarity, text, summary, score, explainer, {scorer} FROM descriptions "
                                "WHERE layer = ? AND neuron = ? ORDER BY polarity DESC", key).fetchall()
            quants = cur.execute("SELECT q, value FROM quantiles WHERE layer = ? AND neuron = ? ORDER BY q",
                                 key).fetchall()
            exs = cur.execute(
                "SELECT polarity, split, rank, seq_id, max_act, scale, acts FROM exemplars "
                "WHERE layer = ? AND neuron = ? "
                "ORDER BY CASE polarity WHEN 1 THEN 0 WHEN -1 THEN 1 ELSE 2 END, "
                "CASE split WHEN 'train' THEN 0 WHEN 'source' THEN 0 WHEN 'test' THEN 1 ELSE 2 END, rank",
                key).fetchall()
            seq_rowid = self.keys.seq_rowid([r[3] for r in exs])  # [m]
            seqs = _by_rowid(cur, "SELECT rowid, source, text, tokens FROM sequences", seq_rowid)
        promotes, suppresses = out[0] if out else ([], [])
        exemplars = []
        for (pol, split, rank, seq_id, max_act, scale, codes), rid in zip(exs, seq_rowid.tolist()):
            source, text, tokens = ((seqs.at[rid, "source"], seqs.at[rid, "text"], seqs.at[rid, "tokens"])
                                    if rid in seqs.index else (None, None, None))
            exemplars.append({
                "polarity": int(pol), "split": split, "rank": int(rank), "seq_id": int(seq_id), "source": source,
                "max_act": float(max_act), "text": text, "tokens": [] if tokens is None else [str(t) for t in tokens],
                "acts": None if codes is None else decode_acts(np.asarray(codes, dtype=np.int8), scale).tolist(),
            })
        return {
            "layer": layer, "neuron": neuron,
            "promotes": list(promotes or []), "suppresses": list(suppresses or []),
            "descriptions": {int(p): {"text": t, "summary": s, "score": None if sc is None else float(sc),
                                      "explainer": e,
                                      "scorer": ssc or (self.meta.get("scorer") if sc is not None else None)}
                             for p, t, s, sc, e, ssc in descs},
            "quantiles": {float(q): float(v) for q, v in quants},
            "exemplars": exemplars,
        }

    def stored_quantiles(self) -> list[float]:
        """The distinct q values in ``quantiles``, ascending."""
        if self._stored_qs is None:
            with self.cursor() as cur:
                self._stored_qs = [float(r[0]) for r in cur.execute("SELECT DISTINCT q FROM quantiles ORDER BY q")
                                   .fetchall()]
        return self._stored_qs

    def nearest_quantile(self, q: float) -> float | None:
        """The stored q closest to ``q`` on the same tail, argmin_s |s − q| over the stored s on
        ``q``'s side of the median (s ≥ 0.5 for q ≥ 0.5, else s < 0.5); None when that tail has none.

        Tail quantiles not stored snap to the nearest stored one: 1 − 1e-7 → 1 (the max) and
        1e-7 → 0 (the min) with the default set {0, 1e-5, 1e-4, 1e-3, 1 − 1e-3, …, 1}. An import
        that published only the max (q = 1) has no lower tail: its negative side is unknown, not
        the max.
        """
        stored = self.stored_quantiles()
        if not stored:
            raise MonitorError(f"{self.path} has no activation quantiles: rebuild it with `{self.rebuild_command}`.")
        q = float(q)
        if not 0.0 <= q <= 1.0:
            raise MonitorError(f"Quantile {q} is outside [0, 1].")
        side = [s for s in stored if (s >= 0.5) == (q >= 0.5)]
        return min(side, key=lambda s: abs(s - q)) if side else None

    def quantile_table(self, q: float) -> np.ndarray:
        """float32 [n_layers, n_neurons] of each neuron's activation quantile at
        :meth:`nearest_quantile` (q); NaN for neurons without one, and everywhere when the tail
        has no stored quantile. Cached; read-only."""
        q = self.nearest_quantile(q)
        table = self._quantiles.get(q)
        if q is None and table is None:
            table = np.full((self.n_layers, self.n_neurons), np.nan, np.float32)  # [layers, neurons]
            table.setflags(write=False)
            self._quantiles[q] = table
        if table is None:
            with self.cursor() as cur:
                rows = cur.execute("SELECT layer, neuron, value FROM quantiles WHERE q = ?", [q]).fetchnumpy()
            table = np.full((self.n_layers, self.n_neurons), np.nan, np.float32)  # [layers, neurons]
            table[np.asarray(rows["layer"]), np.asarray(rows["neuron"])] = np.asarray(rows["value"], np.float32)
            table.setflags(write=False)
            self._quantiles[q] = table
        return table

    def embedding(self, layer: int, neuron: int, polarity: int) -> np.ndarray:
        """float32 [d], the unit-length embedding of one description."""
        layer, neuron = self.check_neuron(layer, neuron)
        if int(polarity) not in (1, -1):
            raise MonitorError(f"Polarity must be 1 or -1, got {polarity}.")
        with self.cursor() as cur:
            rows = cur.execute("SELECT vec FROM embeddings WHERE layer = ? AND neuron = ? AND polarity = ?",
                               [layer, neuron, int(polarity)]).fetchall()
        if not rows:
            raise MonitorError(f"Neuron {layer}/{neuron} has no {'positive' if int(polarity) > 0 else 'negative'} "
                               "description embedding in this database.")
        vec = np.asarray(rows[0][0])
        return vec.astype(np.float32) if vec.dtype.kind == "f" else decode_unit_rows(vec)  # a bundle's int8 codes

    def nearest_neurons(self, layer: int, neuron: int, polarity: int, k: int = 10) -> pd.DataFrame:
        """The k descriptions most similar to this one's (itself excluded); as :meth:`semantic_search`."""
        vec = self.embedding(layer, neuron, polarity)
        hits = self.semantic_search(vec, k=int(k) + 1)
        self_row = (hits["layer"] == int(layer)) & (hits["neuron"] == int(neuron)) & (hits["polarity"] == int(polarity))
        return hits[~self_row].head(int(k)).reset_index(drop=True)

    # ------------------------------------------------------------------ scores
    def scorers(self) -> list[dict]:
        """Every scorer in the scores table: [{name, version, description}] (meta ``scorers``, else
        the table's distinct names); [] for a version-1 file."""
        if not self.has_scores:
            return []
        try:
            listed = json.loads(self.meta.get("scorers") or "[]")
        except ValueError:
            listed = []
        with self.cursor() as cur:
            names = [r[0] for r in cur.execute("SELECT DISTINCT scorer FROM scores ORDER BY scorer").fetchall()]
        known = {d.get("name"): d for d in listed if isinstance(d, dict)}
        return [{"name": n, "version": known.get(n, {}).get("version"), "description": known.get(n, {}).get("description")}
                for n in [d for d in known if d in names] + [n for n in names if n not in known]]

    def _check_scorer(self, scorer: str) -> None:
        names = [d["name"] for d in self.scorers()]
        if scorer not in names:
            raise MonitorError(f"Scorer {scorer!r} is not in this database; it has: {', '.join(names) or 'none'}.")

    def scorer_values(self, scorer: str) -> np.ndarray:
        """float64 [n_layers · n_neurons · 2] of one scorer's value per key code (see
        :func:`cache.key_map.key_codes`); NaN where it has none. Cached; read-only."""
        vals = self._scorer_values.get(scorer)
        if vals is None:
            self._check_scorer(scorer)
            with self.cursor() as cur:
                rows = cur.execute("SELECT layer, neuron, polarity, value FROM scores WHERE scorer = ?",
                                   [scorer]).fetchnumpy()
            vals = np.full(self.n_layers * self.n_neurons * 2, np.nan)
            codes, ok = self.keys.codes(rows["layer"], rows["neuron"], rows["polarity"])
            vals[codes[ok]] = np.ma.filled(np.ma.asarray(rows["value"]), np.nan).astype(np.float64)[ok]
            vals.setflags(write=False)
            self._scorer_values[scorer] = vals
        return vals

    def scores_for(self, layer: int, neuron: int) -> pd.DataFrame:
        """Every score row of one neuron (both polarities; columns as the scores table),
        positive polarity first; empty for a version-1 file."""
        layer, neuron = self.check_neuron(layer, neuron)
        cols = list(COLUMNS["scores"])
        if not self.has_scores:
            return pd.DataFrame(columns=cols)
        with self.cursor() as cur:
            df = cur.execute(f"SELECT {', '.join(cols)} FROM scores WHERE layer = ? AND neuron = ? "
                             "ORDER BY polarity DESC, scorer", [layer, neuron]).df()
        return _typed(df)

    def scores_wide(self, layer, neuron, polarity) -> pd.DataFrame:
        """One column per scorer (its value, NaN where none) for the given keys [m], in order."""
        codes, ok = self.keys.codes(layer, neuron, polarity)
        return pd.DataFrame({d["name"]: np.where(ok, self.scorer_values(d["name"])[codes], np.nan)
                             for d in self.scorers()})

    def descriptions_for(self, pairs: Iterable[Sequence[int]]) -> pd.DataFrame:
        """Both polarities' description, summary and score for each (layer, neuron), in the
        given order (repeats kept); NULL where missing. Columns: :data:`DESCRIPTION_COLUMNS`."""
        pairs = np.asarray([(int(p[0]), int(p[1])) for p in pairs], np.int64).reshape(-1, 2)  # [m, 2]
        layer, neuron = pairs[:, 0], pairs[:, 1]
        out = {"layer": layer, "neuron": neuron}
        for polarity, suffix in ((1, "pos"), (-1, "neg")):
            hits = self._result_rows(layer, neuron, np.full(len(layer), polarity), None)
            out[f"description_{suffix}"] = hits["description"].to_numpy(object)
            out[f"summary_{suffix}"] = hits["summary"].to_numpy(object)
            out[f"score_{suffix}"] = hits["score"].to_numpy(np.float64)
        return _typed(pd.DataFrame(out)[DESCRIPTION_COLUMNS])


def _finite(v) -> float | None:
    """A stored score as a float, None for NULL or NaN."""
    return None if v is None or not np.isfinite(v) else float(v)


def _keyword_clause() -> str:
    return f"(text ILIKE ? ESCAPE '{_ESC}' OR summary ILIKE ? ESCAPE '{_ESC}')"


def _keyword_params(text: str) -> list[str]:
    """``%text%`` with ``\\``, ``%`` and ``_`` escaped, for both ILIKE placeholders."""
    text = str(text) if text is not None else ""
    if not text.strip():
        raise MonitorError("The keyword is empty: type some text to search for.")
    escaped = text.replace(_ESC, _ESC * 2).replace("%", _ESC + "%").replace("_", _ESC + "_")
    return [f"%{escaped}%"] * 2


def _by_rowid(cur: duckdb.DuckDBPyConnection, select: str, rowids: np.ndarray) -> pd.DataFrame:
    """``select`` (which must start ``SELECT rowid, ...`` from one table) restricted to the given
    rowids (-1 ignored), indexed by rowid. DuckDB fetches just those rows."""
    wanted = np.unique(rowids[rowids >= 0]).tolist()
    return cur.execute(select + " WHERE rowid IN (SELECT unnest(?::BIGINT[]))", [wanted]).df().set_index("rowid")


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("layer", "neuron", "polarity"):
        if col in df:
            df[col] = df[col].astype("int64")
    for col in ("score", "similarity", "score_pos", "score_neg"):
        if col in df:
            df[col] = df[col].astype("float64")
    return df.reset_index(drop=True)
