"""Exact cosine top-k over every description embedding, held in RAM as one float32 matrix.

Rows of ``embeddings.vec`` are unit vectors (the writer normalises them), so for a query q

    similarity_i = cos(vec_i, q) = vec_i · q / ‖q‖

and the top k come from one matrix-vector product plus ``np.argpartition`` (O(n)), then a
sort of the k survivors. Filters are a boolean mask applied to the candidates *before*
the top-k, so k results come back whenever k rows pass the filters.

Why not SQL: ``array_inner_product(vec, ?) ... ORDER BY ... LIMIT 500`` over 458,752 × 384
rows took about 140 ms on 2 cores, the NumPy product about 33 ms (see benchmarks/search.py).
The matrix costs n × d × 4 bytes (92,160 rows → 141 MB; 917,504 rows → 1.4 GB) and about
1–3 s to load once per open database.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from .codec import decode_unit_rows
from .key_map import KeyMap


@dataclass(frozen=True)
class EmbeddingIndex:
    """All (layer, neuron, polarity) embeddings; row i of every array is the same key."""

    layer: np.ndarray     # int32 [n]
    neuron: np.ndarray    # int32 [n]
    polarity: np.ndarray  # int8 [n], +1 / -1
    codes: np.ndarray     # int64 [n], key_codes of the rows
    score: np.ndarray     # float64 [n], the description's score, NaN if unscored or missing
    mat: np.ndarray       # float32 [n, d], unit rows
    row_of: np.ndarray    # int64 [n_layers · n_neurons · 2], key code → row, -1 if absent

    @classmethod
    def load(cls, cur: duckdb.DuckDBPyConnection, keys: KeyMap, dim: int) -> "EmbeddingIndex":
        """Read ``embeddings`` once into arrays; scores come from ``keys``."""
        table = cur.sql("SELECT layer, neuron, polarity, vec FROM embeddings").to_arrow_table()
        n = table.num_rows
        mat = np.empty((n, dim), np.float32)  # [n, d]
        start = 0
        for chunk in table.column("vec").chunks:  # FixedSizeList<float>[d]; flatten() honours slicing
            m = len(chunk)
            vals = chunk.flatten().to_numpy().reshape(m, dim)
            mat[start:start + m] = vals if vals.dtype == np.float32 else decode_unit_rows(vals)  # a bundle's int8 codes
            start += m
        layer = table.column("layer").to_numpy().astype(np.int32)
        neuron = table.column("neuron").to_numpy().astype(np.int32)
        polarity = table.column("polarity").to_numpy().astype(np.int8)
        del table
        codes, ok = keys.codes(layer, neuron, polarity)
        if not ok.all():
            raise ValueError("embeddings hold a (layer, neuron) outside meta n_layers × n_neurons")
        row_of = np.full(len(keys.score), -1, np.int64)
        row_of[codes] = np.arange(n)
        return cls(layer, neuron, polarity, codes, keys.score[codes], mat, row_of)

    def __len__(self) -> int:
        return len(self.layer)

    @property
    def dim(self) -> int:
        return self.mat.shape[1]

    def mask(self, layer_range: tuple[int, int] | None = None, polarity: int | None = None,
             min_score: float | None = None, codes: np.ndarray | None = None,
             score: np.ndarray | None = None) -> np.ndarray | None:
        """bool [n]: rows with lo ≤ layer ≤ hi, the polarity, score ≥ min_score, and key code in
        ``codes``; ``score`` [n] replaces the main score (e.g. another scorer's values). None when
        nothing is filtered."""
        keep = None

        def both(m):
            return m if keep is None else keep & m

        if layer_range is not None:
            keep = both((self.layer >= layer_range[0]) & (self.layer <= layer_range[1]))
        if polarity is not None:
            keep = both(self.polarity == polarity)
        if min_score is not None:
            keep = both((self.score if score is None else score) >= min_score)  # NaN (unscored) compares False
        if codes is not None:
            rows = self.row_of[np.asarray(codes, np.int64)]
            sel = np.zeros(len(self), bool)
            sel[rows[rows >= 0]] = True
            keep = both(sel)
        return keep

    def top_k(self, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 [k'], similarity float32 [k']) of the k most similar rows passing ``mask``,
        most similar first (ties by layer, neuron, polarity); k' = min(k, rows passing)."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)  # [d]
        q = q / np.linalg.norm(q)
        sims = self.mat @ q  # [n]
        cand = np.flatnonzero(mask) if mask is not None else None
        s = sims if cand is None else sims[cand]
        k = min(int(k), len(s))
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if k < len(s):
            kth = s[np.argpartition(-s, k - 1)[k - 1]]
            part = np.flatnonzero(s >= kth)  # every row tied with the k-th too, so ties go by key, not by chance
        else:
            part = np.arange(len(s))
        rows = part if cand is None else cand[part]
        rows = rows[np.lexsort((self.codes[rows], -sims[rows]))][:k]
        return rows.astype(np.int64), sims[rows]
