"""Where each neuron's rows live: DuckDB rowids per (layer, neuron, polarity), loaded once.

Search results need, for k keys, the description and the text of the rank-0 train
exemplar. Joining k keys against ``descriptions`` and ``exemplars`` makes DuckDB scan both
tables (``exemplars`` holds ~200 rows per neuron: 92M rows for an 8B model), so instead
one pass at open time records, for every key code

    code = (layer · n_neurons + neuron) · 2 + (polarity < 0)      ∈ [0, n_layers · n_neurons · 2)

the rowid of its description and of its top exemplar's sequence (rank 0 of split train, or of split
source in an import). A lookup is then
``WHERE rowid IN (SELECT unnest(?))``, which DuckDB answers by fetching just those rows.
Rowids are stable because the database is written once and opened read-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np


def key_codes(layer, neuron, polarity, n_neurons: int) -> np.ndarray:
    """int64 code of each key: ``(layer · n_neurons + neuron) · 2 + (polarity < 0)``."""
    layer = np.asarray(layer, dtype=np.int64)
    neuron = np.asarray(neuron, dtype=np.int64)
    neg = (np.asarray(polarity) < 0).astype(np.int64)
    return (layer * n_neurons + neuron) * 2 + neg


def _masked(values, fill) -> np.ndarray:
    """A fetchnumpy column with NULLs replaced by ``fill``."""
    return np.ma.filled(np.ma.asarray(values), fill)


@dataclass(frozen=True)
class KeyMap:
    """Per-key rowids and scores, indexed by :func:`key_codes`; -1 / NaN where absent."""

    n_layers: int
    n_neurons: int
    desc_rowid: np.ndarray     # int64 [C], rowid in descriptions
    score: np.ndarray          # float64 [C], descriptions.score (NaN: unscored or no description)
    top_seq_rowid: np.ndarray  # int64 [C], rowid in sequences of the rank-0 train exemplar
    seq_ids: np.ndarray        # int64 [S], sorted sequences.seq_id
    seq_rowids: np.ndarray     # int64 [S], their rowids

    @classmethod
    def load(cls, cur: duckdb.DuckDBPyConnection, n_layers: int, n_neurons: int) -> "KeyMap":
        size = n_layers * n_neurons * 2
        desc_rowid = np.full(size, -1, np.int64)
        score = np.full(size, np.nan)
        top_seq_rowid = np.full(size, -1, np.int64)

        d = cur.sql("SELECT rowid, layer, neuron, polarity, score FROM descriptions").fetchnumpy()
        codes, ok = cls._valid(d, n_layers, n_neurons)
        desc_rowid[codes[ok]] = np.asarray(d["rowid"], np.int64)[ok]
        score[codes[ok]] = _masked(d["score"], np.nan).astype(np.float64)[ok]

        s = cur.sql("SELECT seq_id, rowid FROM sequences ORDER BY seq_id").fetchnumpy()
        seq_ids = np.asarray(s["seq_id"], np.int64)
        seq_rowids = np.asarray(s["rowid"], np.int64)

        x = cur.sql("SELECT layer, neuron, polarity, seq_id FROM exemplars "
                    "WHERE split IN ('train', 'source') AND rank = 0").fetchnumpy()
        codes, ok = cls._valid(x, n_layers, n_neurons)
        rowids = _lookup(seq_ids, seq_rowids, np.asarray(x["seq_id"], np.int64))
        top_seq_rowid[codes[ok]] = rowids[ok]
        return cls(n_layers, n_neurons, desc_rowid, score, top_seq_rowid, seq_ids, seq_rowids)

    @staticmethod
    def _valid(cols: dict, n_layers: int, n_neurons: int) -> tuple[np.ndarray, np.ndarray]:
        layer = np.asarray(cols["layer"], np.int64)
        neuron = np.asarray(cols["neuron"], np.int64)
        ok = (layer >= 0) & (layer < n_layers) & (neuron >= 0) & (neuron < n_neurons)
        return key_codes(np.where(ok, layer, 0), np.where(ok, neuron, 0), cols["polarity"], n_neurons), ok

    def codes(self, layer, neuron, polarity) -> tuple[np.ndarray, np.ndarray]:
        """(codes int64 [m], in_range bool [m]); out-of-range keys get code 0."""
        return self._valid({"layer": layer, "neuron": neuron, "polarity": polarity}, self.n_layers, self.n_neurons)

    def seq_rowid(self, seq_ids) -> np.ndarray:
        """int64 [m]: rowid of each seq_id in ``sequences``, -1 if it has none."""
        return _lookup(self.seq_ids, self.seq_rowids, np.asarray(seq_ids, np.int64).reshape(-1))


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[i] where sorted_keys[i] == wanted, else -1 (binary search)."""
    if len(sorted_keys) == 0:
        return np.full(len(wanted), -1, np.int64)
    pos = np.clip(np.searchsorted(sorted_keys, wanted), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == wanted, values[pos], -1)
