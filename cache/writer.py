"""Write a neuron database in bulk, atomically.

The database is built in ``<path>.duckdb.tmp`` (see :func:`cache.paths.tmp_path`) and
:meth:`DatabaseWriter.finish` checkpoints, closes and renames it to ``path`` with
``os.replace``, so ``path`` is either the previous complete database or the new complete
one, never half of one. A killed build leaves only the ``.tmp`` file, which the reader
reports as an interrupted build and the next writer deletes.

Every ``write_*`` method takes a whole batch (pandas DataFrame or Arrow table with the
table's columns, in any order), converts it to Arrow with the table's exact types,
registers it with DuckDB and runs one ``INSERT INTO t (cols) SELECT cols FROM batch
ORDER BY key``: no Python loop over rows. Batches may be written in several calls (for
example one per layer); writing them in key order keeps each table sorted, so DuckDB's
zone maps make single-neuron lookups cheap.

An importer (:mod:`cache.importers`) passes ``resume=True``: an existing ``.tmp`` is then
kept and written on, each batch inside :meth:`DatabaseWriter.transaction` together with
its progress marker, so a killed import loses at most the batch it was writing.

Usage::

    with DatabaseWriter(db_path("embedded"), embedding_dim=384) as w:
        w.write_meta({...})
        w.write_neurons(df)
        ...
    # leaving the block without an exception calls finish()
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .paths import tmp_path
from .schema import COLUMNS, IMPORTED_META, REQUIRED_META, SCHEMA_VERSION, SCORE_SPLITS, SORT_KEYS, schema_sql

_STR_LIST = pa.list_(pa.string())

# Arrow types matching schema.sql column for column.
ARROW_SCHEMAS: dict[str, pa.Schema] = {
    "neurons": pa.schema([("layer", pa.int32()), ("neuron", pa.int32()),
                          ("promotes", _STR_LIST), ("suppresses", _STR_LIST)]),
    "sequences": pa.schema([("seq_id", pa.int32()), ("source", pa.string()), ("text", pa.string()),
                            ("tokens", _STR_LIST)]),
    "descriptions": pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("polarity", pa.int8()),
                               ("text", pa.string()), ("summary", pa.string()), ("score", pa.float64()),
                               ("explainer", pa.string()), ("score_scorer", pa.string())]),
    "exemplars": pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("polarity", pa.int8()),
                            ("split", pa.string()), ("rank", pa.int32()), ("seq_id", pa.int32()),
                            ("max_act", pa.float32()), ("scale", pa.float32()), ("acts", pa.list_(pa.int8()))]),
    "quantiles": pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("q", pa.float64()),
                            ("value", pa.float32())]),
    "scores": pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("polarity", pa.int8()),
                         ("scorer", pa.string()), ("version", pa.string()), ("value", pa.float64()),
                         ("split", pa.string()), ("n", pa.int32()), ("detail", pa.string())]),
}

# Columns a batch may leave out; they are written as NULL (schema version 2 added them).
OPTIONAL_COLUMNS = {"descriptions": ("score_scorer",)}

# 'source': an imported top exemplar, as published (the publisher's train/test split is unknown).
EXEMPLAR_SPLITS = ("train", "test", "random", "source")

Batch = pd.DataFrame | pa.Table


# DuckDB's buffer pool while a database is written. Its default (80% of RAM) kept the written blocks
# cached: the full embedded build's write stage peaked at 2,504 MB with it and 1,869 MB with 512 MB,
# in the same 18 s (2-core machine, 754 MB database). The data is checkpointed to the file either way.
WRITE_MEMORY_LIMIT = "512MB"


class DatabaseWriter:
    """Builds one neuron database file; see the module docstring for the protocol."""

    def __init__(self, path: str | os.PathLike, embedding_dim: int, resume: bool = False):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self.embedding_dim = int(embedding_dim)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resumed = resume and self.tmp.exists()
        if not self.resumed:
            for stale in (self.tmp, self.tmp.with_name(self.tmp.name + ".wal")):
                stale.unlink(missing_ok=True)
        self._conn: duckdb.DuckDBPyConnection | None = duckdb.connect(str(self.tmp), config={"memory_limit": WRITE_MEMORY_LIMIT})
        self._conn.execute(schema_sql(self.embedding_dim))
        self._n_batches = 0
        self.write_meta({"schema_version": SCHEMA_VERSION, "embedding_dim": self.embedding_dim})

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "DatabaseWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._conn is not None:
                self.finish()
        else:
            self.close()  # leave the .tmp behind: it marks an interrupted build

    @property
    def conn(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            raise RuntimeError(f"DatabaseWriter for {self.path} is already finished or closed")
        return self._conn

    @contextlib.contextmanager
    def transaction(self):
        """Everything written inside the block commits together, or not at all (an exception,
        or a kill, rolls the block back)."""
        conn = self.conn
        conn.begin()
        try:
            yield self
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def close(self) -> None:
        """Close without publishing: ``path`` is untouched and the ``.tmp`` file stays."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def finish(self) -> Path:
        """Check the meta keys, checkpoint, close and atomically rename ``.tmp`` → ``path``."""
        conn = self.conn
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "build_time" not in meta:
            self.write_meta({"build_time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            meta["build_time"] = "set"
        required = IMPORTED_META if "source" in meta else REQUIRED_META
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"cannot finish {self.path.name}: meta keys missing: {', '.join(missing)}")
        conn.execute("CHECKPOINT")
        self.close()
        os.replace(self.tmp, self.path)
        return self.path

    # ------------------------------------------------------------------ tables
    def write_meta(self, items: Mapping[str, Any]) -> None:
        """Upsert key/value facts; non-string values are stored as JSON (``3`` → ``"3"``)."""
        rows = pa.table({
            "key": pa.array([str(k) for k in items], pa.string()),
            "value": pa.array([v if isinstance(v, str) else json.dumps(v) for v in items.values()], pa.string()),
        })
        self._insert_arrow("meta", rows, ("key", "value"), order=(), upsert=True)

    def write_neurons(self, df: Batch) -> None:
        """Rows ``layer, neuron, promotes: list[str], suppresses: list[str]``."""
        self._insert("neurons", df)

    def write_sequences(self, df: Batch) -> None:
        """Rows ``seq_id, source, text, tokens: list[str]``."""
        self._insert("sequences", df)

    def write_descriptions(self, df: Batch) -> None:
        """Rows ``layer, neuron, polarity (±1), text, summary, score (NaN/None = unscored), explainer,
        score_scorer`` (the ``scores.scorer`` that ``score`` is; None when unscored)."""
        table = self._arrow("descriptions", df)
        _check_polarity(table, (1, -1), "descriptions")
        self._insert_arrow("descriptions", table)

    def write_exemplars(self, df: Batch) -> None:
        """Rows ``layer, neuron, polarity, split, rank, seq_id, max_act, scale, acts: int8 codes``.

        ``acts`` and ``scale`` come from :func:`cache.codec.encode_acts`, or are both None for an
        imported exemplar without per-token activations. ``polarity`` is ±1 for ``split`` in
        {train, test, source} and 0 for ``split == 'random'``.
        """
        table = self._arrow("exemplars", df)
        _check_polarity(table, (1, -1, 0), "exemplars")
        splits = set(table.column("split").unique().to_pylist())
        if not splits <= set(EXEMPLAR_SPLITS):
            raise ValueError(f"exemplars: unknown split(s) {sorted(splits - set(EXEMPLAR_SPLITS))}")
        pol = table.column("polarity").to_numpy()
        is_random = pc.equal(table.column("split"), "random").to_numpy(zero_copy_only=False)
        if np.any((pol == 0) != is_random):
            raise ValueError("exemplars: polarity must be 0 exactly for split 'random'")
        if not pc.equal(pc.is_null(table.column("acts")), pc.is_null(table.column("scale"))).to_numpy(
                zero_copy_only=False).all():
            raise ValueError("exemplars: acts and scale must be both given or both None")
        self._insert_arrow("exemplars", table)

    def write_scores(self, df: Batch) -> None:
        """Rows ``layer, neuron, polarity (±1), scorer, version, value (NaN/None = no prediction),
        split ('test' | 'train' | 'source'), n (None = unknown), detail (JSON or None)``."""
        table = self._arrow("scores", df)
        _check_polarity(table, (1, -1), "scores")
        splits = set(table.column("split").unique().to_pylist())
        if not splits <= set(SCORE_SPLITS):
            raise ValueError(f"scores: unknown split(s) {sorted(map(str, splits - set(SCORE_SPLITS)))}")
        self._insert_arrow("scores", table)

    def write_quantiles(self, df: Batch) -> None:
        """Rows ``layer, neuron, q, value`` (q in [0, 1]; 0 and 1 are the min and max)."""
        self._insert("quantiles", df)

    def write_embeddings(self, layers: np.ndarray, neurons: np.ndarray, polarities: np.ndarray,
                         vecs: np.ndarray) -> None:
        """Store description embeddings, L2-normalised: ``vec / ‖vec‖₂``.

        layers, neurons, polarities: int [n]; vecs: float [n, d] with d = embedding_dim.
        """
        vecs = np.asarray(vecs, dtype=np.float32)
        n = len(vecs)
        if vecs.ndim != 2 or vecs.shape[1] != self.embedding_dim:
            raise ValueError(f"vecs must be [n, {self.embedding_dim}], got {list(vecs.shape)}")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)  # [n, 1]
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("every embedding must be finite and non-zero to normalise")
        unit = np.ascontiguousarray(vecs / norms, dtype=np.float32)  # [n, d]
        cols = [np.asarray(a).reshape(-1) for a in (layers, neurons, polarities)]
        if any(len(c) != n for c in cols):
            raise ValueError(f"layers, neurons and polarities must each have {n} entries")
        table = pa.table({
            "layer": pa.array(cols[0].astype(np.int32)),
            "neuron": pa.array(cols[1].astype(np.int32)),
            "polarity": pa.array(cols[2].astype(np.int8)),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1)), self.embedding_dim),
        })
        _check_polarity(table, (1, -1), "embeddings")
        self._insert_arrow("embeddings", table)

    # ------------------------------------------------------------------ helpers
    def _arrow(self, name: str, df: Batch) -> pa.Table:
        """The batch as an Arrow table with exactly the table's columns and types."""
        schema = ARROW_SCHEMAS[name]
        have = list(df.column_names if isinstance(df, pa.Table) else df.columns)
        for col in OPTIONAL_COLUMNS.get(name, ()):
            if col not in have:
                df = (df.append_column(col, pa.nulls(len(df), schema.field(col).type)) if isinstance(df, pa.Table)
                      else df.assign(**{col: None}))
                have.append(col)
        missing = [c for c in schema.names if c not in have]
        extra = [c for c in have if c not in schema.names]
        if missing or extra:
            raise ValueError(f"{name}: columns must be {list(schema.names)}; missing {missing}, unexpected {extra}")
        if isinstance(df, pa.Table):
            return df.select(schema.names).cast(schema)
        return pa.Table.from_pandas(df[list(schema.names)], schema=schema, preserve_index=False)

    def _insert(self, name: str, df: Batch) -> None:
        self._insert_arrow(name, self._arrow(name, df))

    def _insert_arrow(self, name: str, table: pa.Table, cols: tuple[str, ...] | None = None,
                      order: tuple[str, ...] | None = None, upsert: bool = False) -> None:
        """``INSERT INTO name (cols) SELECT cols FROM <registered batch> ORDER BY order``."""
        if table.num_rows == 0:
            return
        cols = cols or COLUMNS[name]
        order = SORT_KEYS.get(name, ()) if order is None else order
        self._n_batches += 1
        view = f"_batch_{self._n_batches}"
        col_list = ", ".join(f'"{c}"' for c in cols)
        sql = (f"INSERT {'OR REPLACE ' if upsert else ''}INTO {name} ({col_list}) "
               f"SELECT {col_list} FROM {view}" + (f" ORDER BY {', '.join(order)}" if order else ""))
        conn = self.conn
        conn.register(view, table)
        try:
            conn.execute(sql)
        finally:
            conn.unregister(view)


def _check_polarity(table: pa.Table, allowed: tuple[int, ...], name: str) -> None:
    pol = table.column("polarity").to_numpy()
    if not np.isin(pol, allowed).all():
        raise ValueError(f"{name}: polarity must be one of {allowed}, got {sorted(set(pol.tolist()) - set(allowed))}")
