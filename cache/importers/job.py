"""One resumable import into a neuron database: progress, batches, re-embedding, finishing.

Every importer (:mod:`cache.importers.transluce`, ``.neuronpedia``, ``.openai``) reads its
source in batches and hands each to :meth:`ImportJob.commit`, which writes the batch and the
step's new position in **one DuckDB transaction** in ``<out>.duckdb.tmp``. A kill at any
moment therefore loses at most the batch in flight; rerunning the same command finds the
``.tmp``, checks that it holds the same import (the ``job`` fingerprint: source, model,
options) and carries on from the stored positions. Nothing is read twice into the output, and
nothing is skipped. :meth:`ImportJob.finish` embeds the summaries (itself resumable, by
descriptions rowid), writes meta, drops the bookkeeping table and renames ``.tmp`` to the
output, so the output is complete or absent, never half-written.

Memory is bounded by one batch (plus the embedder): rows stream from the source, are written,
and dropped.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import duckdb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from engine.errors import MonitorError
from engine.kill_points import kill_point

from ..paths import tmp_path
from ..schema import SCHEMA_VERSION
from ..writer import DatabaseWriter

PROGRESS_TABLE = "_import_progress"
KILL_VAR = "MONITOR_IMPORT_KILL_AT"  # test hook: "<step>:<batch>" SIGKILLs the import there
EMBED_CHUNK = 2048  # summaries per embedding transaction


class ImportJob:
    """The output file of one import and its resumable progress (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, job: dict, *, embedder: str | None = None, fresh: bool = False,
                 force: bool = False, progress: bool = True, source_embedding_dim: int | None = None,
                 embed_chunk: int = EMBED_CHUNK):
        self.out = Path(out)
        self.embed_chunk = int(embed_chunk)
        self.tmp = tmp_path(self.out)
        self.job = {"schema_version": SCHEMA_VERSION, **job}
        self.embedder = embedder
        self.progress = progress
        self._batches: dict[str, int] = {}
        if self.out.exists() and not force:
            raise MonitorError(f"{self.out} already exists: pass --force to replace it (it stays in place until the "
                               "new import finishes), or choose another --out.")
        if fresh:
            for stale in (self.tmp, self.tmp.with_name(self.tmp.name + ".wal")):
                stale.unlink(missing_ok=True)
        from ..embedder import embedding_dim, model_id

        self.embedding_model = model_id(embedder)
        self.job["embedding_model"] = self.embedding_model
        try:
            self.writer = DatabaseWriter(self.out, embedding_dim(embedder), resume=True)
        except duckdb.IOException as err:
            raise MonitorError(f"{self.tmp} is in use by another process (is an import of it still running?): wait "
                               "for it, or stop it and rerun this command.") from err
        except duckdb.Error as err:
            raise MonitorError(f"{self.tmp} is not a readable unfinished import ({_first(err)}): rerun with --fresh "
                               "to start over.") from err
        conn = self.writer.conn
        conn.execute(f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
        if source_embedding_dim:
            conn.execute("CREATE TABLE IF NOT EXISTS source_embeddings (layer INTEGER NOT NULL, neuron INTEGER NOT NULL, "
                         f"polarity TINYINT NOT NULL, vec FLOAT[{int(source_embedding_dim)}] NOT NULL, "
                         "PRIMARY KEY (layer, neuron, polarity))")
        stored = self.get("job")
        fingerprint = json.dumps(self.job, sort_keys=True)
        if stored is None:
            if self.writer.resumed and self._has_rows():
                self.writer.close()
                raise MonitorError(f"{self.tmp} is a database build or import this command did not start: rerun "
                                   "with --fresh to discard it.")
            self.set("job", fingerprint)
        elif stored != fingerprint:
            self.writer.close()
            was = json.loads(stored)
            raise MonitorError(f"{self.tmp} holds an unfinished import of another source or with other options "
                               f"({_describe(was)}): rerun that command to finish it, or pass --fresh to discard it.")
        self.resumed = stored is not None

    # ------------------------------------------------------------------ progress
    @property
    def conn(self) -> duckdb.DuckDBPyConnection:
        return self.writer.conn

    def get(self, key: str) -> str | None:
        rows = self.conn.execute(f"SELECT value FROM {PROGRESS_TABLE} WHERE key = ?", [key]).fetchall()
        return rows[0][0] if rows else None

    def set(self, key: str, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        self.conn.execute(f"INSERT OR REPLACE INTO {PROGRESS_TABLE} VALUES (?, ?)", [key, text])

    def position(self, step: str, default: Any = None) -> Any:
        """Where ``step`` stopped (whatever the importer stored), or ``default``."""
        raw = self.get(f"pos:{step}")
        return default if raw is None else json.loads(raw)

    def done(self, step: str) -> bool:
        return self.get(f"done:{step}") is not None

    def commit(self, step: str, position: Any, write: Callable[[DatabaseWriter], None]) -> None:
        """Run ``write(writer)`` and store ``position`` for ``step``, in one transaction."""
        with self.writer.transaction():
            write(self.writer)
            self.set(f"pos:{step}", position)
        n = self._batches[step] = self._batches.get(step, 0) + 1
        kill_point(KILL_VAR, step, n)

    def mark_done(self, step: str, info: Any = None) -> None:
        self.set(f"done:{step}", info if info is not None else {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def info(self, step: str) -> Any:
        raw = self.get(f"done:{step}")
        return None if raw is None else json.loads(raw)

    def next_seq_id(self) -> int:
        """The first unused ``sequences.seq_id`` (imports give every exemplar text its own row)."""
        return int(self.conn.execute("SELECT coalesce(max(seq_id) + 1, 0) FROM sequences").fetchall()[0][0])

    def bar(self, total: int | None, desc: str, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=desc, unit="row", disable=not self.progress, leave=False,
                    dynamic_ncols=True)

    def _has_rows(self) -> bool:
        return any(self.conn.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                   for t in ("descriptions", "exemplars", "sequences", "quantiles"))

    # ------------------------------------------------------------------ embeddings
    def embed_summaries(self) -> None:
        """Embed every description's summary with the project's embedder, ``embed_chunk`` at a time in
        descriptions rowid order (the key order the rows were written in), each chunk committed
        with its last rowid. Equal summaries within a chunk are embedded once."""
        from ..embedder import embed

        step = "embeddings"
        if self.done(step):
            return
        total = int(self.conn.execute("SELECT count(*) FROM descriptions").fetchall()[0][0])
        done = int(self.conn.execute("SELECT count(*) FROM embeddings").fetchall()[0][0])
        last = self.position(step, -1)
        with self.bar(total, "embed summaries", initial=done) as bar:
            t0, n0 = time.perf_counter(), done
            while True:
                rows = self.conn.execute("SELECT rowid, layer, neuron, polarity, summary FROM descriptions "
                                         "WHERE rowid > ? ORDER BY rowid LIMIT ?", [last, self.embed_chunk]).fetchnumpy()
                if len(rows["rowid"]) == 0:
                    break
                texts, inverse = np.unique(np.asarray(rows["summary"], dtype=object).astype(str), return_inverse=True)
                vecs = embed(list(texts), name=self.embedder)[inverse]  # [rows, d]
                last = int(rows["rowid"][-1])
                self.commit(step, last, lambda w: w.write_embeddings(rows["layer"], rows["neuron"], rows["polarity"], vecs))
                done += len(vecs)
                bar.update(len(vecs))
        rate = (done - n0) / max(time.perf_counter() - t0, 1e-9)
        self.mark_done(step, {"n": done, "per_s": round(rate, 1) if done > n0 else None})

    # ------------------------------------------------------------------ finishing
    def finish(self, meta: dict) -> Path:
        """Write meta (with the embedder and versions), drop the bookkeeping, rename ``.tmp`` → out."""
        conn = self.conn
        for (table,) in conn.execute("SELECT table_name FROM duckdb_tables() WHERE table_name LIKE '\\_%' ESCAPE '\\'"
                                     ).fetchall():
            if table != PROGRESS_TABLE:
                conn.execute(f'DROP TABLE "{table}"')
        self.writer.write_meta({
            **meta,
            "embedding_model": self.embedding_model,
            "embedding_dim": str(self.writer.embedding_dim),
            "versions": json.dumps(_versions()),
        })
        conn.execute(f"DROP TABLE {PROGRESS_TABLE}")
        return self.writer.finish()

    def close(self) -> None:
        self.writer.close()


def import_command(words: Iterable[str]) -> str:
    """A shell command line from its words, quoted where needed."""
    return " ".join(shlex.quote(str(w)) for w in words)


def frame(rows: list[tuple], columns: Iterable[str]) -> pd.DataFrame:
    """Rows as a DataFrame with the given columns (also when there are none)."""
    return pd.DataFrame.from_records(rows, columns=list(columns))


def token_record(tokens, values, path: Path, what: str) -> tuple[float, float, list[int], str, list[str]]:
    """A published text with per-token activations as we store it: (max activation, scale, int8
    codes (:func:`cache.codec.encode_acts`), text = the tokens joined, tokens as strings).
    MonitorError naming ``path`` and ``what`` when the two lists do not match."""
    from ..codec import encode_acts

    tokens, values = list(tokens or []), list(values or [])
    if len(tokens) != len(values) or not tokens:
        raise MonitorError(f"{path} is corrupt ({what} has {len(tokens)} tokens but {len(values)} activations): "
                           "download it again, or delete it, then rerun the same command.")
    vals = [float(v) for v in values]
    codes, scale = encode_acts(vals)
    words = [str(t) for t in tokens]
    return max(vals), float(scale[0]), codes.tolist(), "".join(words), words


def finite(value) -> float | None:
    """``float(value)`` when that is a finite number, else None (a published score or value)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(job: dict) -> str:
    keep = {k: v for k, v in job.items() if k not in ("schema_version", "embedding_model") and v not in (None, "", [])}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("duckdb", "psycopg", "sentence-transformers", "numpy", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
