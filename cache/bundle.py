"""A compact, read-only copy of a neuron database for hosting: ``python -m cache bundle --out demo.duckdb``.

What changes against the source database (everything else is copied row for row):

- ``embeddings.vec`` is ``TINYINT[d]``: each unit row as int8 codes ``round(127 · v / max|v|)``
  (:func:`cache.codec.encode_unit_rows`); readers renormalise, so cosine search is unchanged up
  to the rounding. 4× smaller.
- ``exemplars`` keeps the ``exemplars_per_side`` most extreme top exemplars of each (neuron,
  polarity) (train ranks first, as the neuron page shows them) and drops the shared random
  sample, which only the build's scorers needed. Per-token activations stay the int8 codes of
  :mod:`cache.codec`.
- meta ``bundle`` says so (JSON: source file, exemplars kept, embedding codes), and the file is
  left read-only (mode 0444).

The bundle is checked before it is published: for each of :data:`CHECK_QUERIES`, the top-20
semantic hits of the bundle and of the source must overlap in at least ``min_overlap`` of
their (layer, neuron, polarity) keys (:func:`search_overlap`); otherwise nothing is written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from engine.errors import MonitorError

from .codec import encode_unit_rows
from .paths import tmp_path
from .schema import COLUMNS, SORT_KEYS, schema_sql

# Fixed queries for the search-quality check: concepts the default corpus covers, and a few it does not.
CHECK_QUERIES = (
    "Bible verses", "dates and years", "decimal numbers", "Python code", "function definitions",
    "names of people", "punctuation at the end of a sentence", "words about war", "the word 'the'",
    "plural nouns", "questions", "poetry and rhyme", "legal language", "numbers in a list",
    "capital letters", "chemistry", "cooking recipes", "emotions and feelings", "version numbers",
    "closing brackets",
)
COPIED = ("meta", "neurons", "sequences", "descriptions", "scores", "quantiles")


def _without_keys(sql: str) -> str:
    """The schema without its PRIMARY KEY indexes: a read-only file needs no uniqueness checks, and
    readers find rows through the sort order's zone maps (cache/schema.py SORT_KEYS), not the indexes
    (about 20 MB of the embedded model's bundle)."""
    sql = re.sub(r",\s*PRIMARY KEY\s*\([^)]*\)", "", sql)
    return re.sub(r"\s+PRIMARY KEY\b", "", sql)


def search_overlap(a, b, queries=CHECK_QUERIES, k: int = 20) -> list[float]:
    """For each query: |top-k keys of ``a`` ∩ top-k keys of ``b``| / k (semantic search, no filters)."""
    from .embedder import embed

    vecs = embed(list(queries))
    out = []
    for q in vecs:
        ka = {tuple(r) for r in a.semantic_search(q, k=k)[["layer", "neuron", "polarity"]].itertuples(index=False)}
        kb = {tuple(r) for r in b.semantic_search(q, k=k)[["layer", "neuron", "polarity"]].itertuples(index=False)}
        out.append(len(ka & kb) / k)
    return out


def write_bundle(source: str | os.PathLike, out: str | os.PathLike, exemplars_per_side: int = 5,
                 min_overlap: float = 0.9, progress: bool = True) -> dict:
    """Write the bundle of ``source`` at ``out`` (see the module docstring); returns its report
    {path, source_mb, bundle_mb, overlap_mean, overlap_min, exemplars_per_side}."""
    from .db import open_database

    out, source = Path(out), Path(source)
    if exemplars_per_side < 1:
        raise MonitorError("--exemplars must be at least 1.")
    if out.resolve() == source.resolve():
        raise MonitorError(f"--out {out} is the source database itself: choose another file.")
    src = open_database(source, read_only=True)
    meta = src.meta
    dim = int(meta["embedding_dim"])
    tmp = tmp_path(out)
    tmp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = [*COPIED, "embeddings", "exemplars", "check"]
    bar = tqdm(total=len(steps), desc="bundle", disable=not progress)
    conn = duckdb.connect(str(tmp))
    try:
        conn.execute(_without_keys(schema_sql(dim, "TINYINT")))
        conn.execute("ATTACH ? AS src (READ_ONLY)", [str(source)])
        src_tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'src'").fetchall()}
        for table in COPIED:
            if table in src_tables:  # a version-1 file has no scores table and no descriptions.score_scorer
                have = {r[0] for r in conn.execute("SELECT column_name FROM duckdb_columns() WHERE database_name = 'src' "
                                                   "AND table_name = ?", [table]).fetchall()}
                cols = ", ".join(c for c in COLUMNS.get(table, ("key", "value")) if c in have)
                order = ", ".join(SORT_KEYS.get(table, ("key",)))
                conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM src.{table} ORDER BY {order}")
            bar.update(1)
        emb = conn.sql("SELECT layer, neuron, polarity, vec FROM src.embeddings ORDER BY layer, neuron, polarity").to_arrow_table()
        vecs = emb.column("vec").combine_chunks().flatten().to_numpy().reshape(-1, dim)  # [n, d]
        codes = encode_unit_rows(vecs)  # int8 [n, d]
        del vecs
        table = pa.table({"layer": emb.column("layer"), "neuron": emb.column("neuron"), "polarity": emb.column("polarity"),
                          "vec": pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.int8()), dim)})
        conn.register("emb_codes", table)
        conn.execute("INSERT INTO embeddings SELECT layer, neuron, polarity, vec FROM emb_codes")
        conn.unregister("emb_codes")
        del table, emb, codes
        bar.update(1)
        cols = ", ".join(COLUMNS["exemplars"])
        conn.execute(f"INSERT INTO exemplars ({cols}) SELECT {cols} FROM src.exemplars "
                     "WHERE polarity <> 0 AND rank < ? ORDER BY layer, neuron, polarity, split, rank",
                     [int(exemplars_per_side)])
        info = {"source": source.name, "source_build_time": meta.get("build_time"),
                "exemplars_per_side": int(exemplars_per_side), "random_exemplars": False,
                "embeddings": "int8 codes per row (cache/codec.py encode_unit_rows), renormalised on read"}
        conn.execute("DELETE FROM meta WHERE key = 'bundle'")
        conn.execute("INSERT INTO meta VALUES ('bundle', ?)", [json.dumps(info)])
        conn.execute("DETACH src")
        conn.execute("CHECKPOINT")
        bar.update(1)
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        src.close()
        raise
    conn.close()
    try:
        with open_database(tmp, read_only=True) as small:
            overlap = search_overlap(src, small)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    bar.update(1)
    bar.close()
    if min(overlap) < min_overlap:
        tmp.unlink(missing_ok=True)
        raise MonitorError(f"The bundle's search differs from {source.name}'s (top-20 overlap {min(overlap):.2f} < "
                           f"{min_overlap} on some query); nothing written.")
    os.chmod(tmp, 0o444)
    os.replace(tmp, out)
    return {"path": str(out), "source_mb": round(source.stat().st_size / 1e6, 1),
            "bundle_mb": round(out.stat().st_size / 1e6, 1), "overlap_mean": float(np.mean(overlap)),
            "overlap_min": float(min(overlap)), "exemplars_per_side": int(exemplars_per_side)}

