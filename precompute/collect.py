"""Streaming collection of exemplars and extreme values over the corpus.

For every neuron (flattened as ``f = layer × n_neurons + neuron``) and both polarities,
:class:`Collector` keeps, without ever holding the corpus's activations:

* the top-``K`` sequences by max activation (polarity +1) and by min activation
  (polarity −1), with their per-token activations (float16) — ties broken by the
  smaller sequence id, so the result does not depend on batch order or sharding;
* the ``M`` largest and ``M`` smallest token activations, from which the extreme
  quantiles are exact as long as ``M ≥ q × (n_tokens − 1) + 2`` for every stored level;
* the per-token activations of a fixed random sample of sequences.

Both top lists are updated sparsely: a batch only touches the neurons (for sequences)
or the cells (for token extremes) that beat the current K-th / M-th value, which after
the first batches is a small fraction, so collection stays cheap next to the forward.

The first ``skip_prefix`` tokens of every sequence (default 1) are left out of the
maxima and the quantiles: position 0 is the attention sink, where a few neurons reach
|a| ≈ 3,000 whatever the text (the reference also excluded a fixed prefix).

States merge exactly (:meth:`Collector.merge`): the top-K of a union is the top-K of
the parts' top-Ks, so shards processed by different processes combine into the state
one process would have produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

QUANTILE_LEVELS = (0.0, 1e-5, 1e-4, 1e-3, 1 - 1e-3, 1 - 1e-4, 1 - 1e-5, 1.0)
NO_ID = torch.iinfo(torch.long).max  # empty slots sort after every real sequence id
IO_BLOCK_BYTES = 32 << 20  # Collector.save/load convert about this much state at a time
FEATURE_BLOCK = 4096  # features a dense step (first batch, sorting, merging) handles at a time


def extremes_needed(n_tokens: int, max_level: float = 1e-3) -> int:
    """How many extreme values per end make the quantiles up to ``max_level`` exact."""
    return int(math.ceil(max_level * max(n_tokens - 1, 0))) + 2


@dataclass
class CollectorState:
    top_vals: torch.Tensor  # [2, F, K] float32 per polarity (0: max, 1: −min); sorted descending after flush()
    top_ids: torch.Tensor  # [2, F, K] int64 sequence ids (NO_ID = empty)
    top_acts: torch.Tensor  # [2, F, K, T] float16 per-token activations of those sequences
    ext: torch.Tensor  # [2, F, M] float32: the M largest values / largest negated values, descending
    random_ids: torch.Tensor  # [R] int64, the random sample's sequence ids
    random_acts: torch.Tensor  # [R, T, F] float16
    random_seen: torch.Tensor  # [R] bool
    n_tokens: torch.Tensor  # [] int64, tokens counted in ext (after the skipped prefix)
    next_batch: torch.Tensor  # [] int64, resume point of the process that owns this state

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _top_rows(vals: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the column indices of the k best by value descending, then id ascending. [R, C] → [R, k]."""
    by_id = torch.sort(ids, dim=1, stable=True).indices
    by_val = torch.sort(vals.gather(1, by_id), dim=1, descending=True, stable=True).indices[:, :k]
    return by_id.gather(1, by_val)


class Collector:
    def __init__(self, n_features: int, seq_len: int, k: int, m: int, random_ids, skip_prefix: int = 1,
                 device="cpu", pool_limit: int = 2_000_000, allocate: bool = True):
        """``allocate=False`` leaves the state's large tensors empty (``load`` fills them)."""
        self.k, self.m, self.t, self.f = k, m, seq_len, n_features
        self.skip = skip_prefix
        self.device = torch.device(device)
        self.pool_limit = pool_limit
        rid = torch.as_tensor(np.asarray(sorted(set(int(r) for r in random_ids)), dtype=np.int64))
        f = n_features if allocate else 0
        self.state = CollectorState(
            top_vals=torch.full((2, f, k), -math.inf, device=self.device),
            top_ids=torch.full((2, f, k), NO_ID, dtype=torch.long, device=self.device),
            top_acts=torch.zeros((2, f, k, seq_len), dtype=torch.float16, device=self.device),
            ext=torch.full((2, f, m), -math.inf, device=self.device),
            random_ids=rid,
            random_acts=torch.zeros((len(rid), seq_len, f), dtype=torch.float16),
            random_seen=torch.zeros(len(rid), dtype=torch.bool),
            n_tokens=torch.tensor(0),
            next_batch=torch.tensor(0),
        )
        self._pool = [([], []), ([], [])]  # per polarity: candidate (feature, value) chunks
        self._pool_size = [0, 0]
        self._buf = None  # (acts [b, F, T], max [b, F], min [b, F]) reused by update_layers

    # -- sequences -------------------------------------------------------------------
    def _update_top(self, p: int, best: torch.Tensor, seq_ids: torch.Tensor, acts: torch.Tensor) -> None:
        """best [b, F]: each sequence's signed max; acts [b, F, T].

        The K slots of a feature are kept in arrival order, not sorted: a batch only
        decides, on values and ids alone, which slots are evicted and which sequences
        enter, then writes the entering sequences' activations into the freed slots.
        So the per-token copy is proportional to what enters the top lists (a few
        percent of the stream after the first batches), not to what is compared.
        """
        s = self.state
        worst = s.top_vals[p].amin(dim=1)  # [F] the K-th best value (−inf while a slot is empty)
        touched = torch.nonzero((best >= worst[None, :]).any(0)).flatten()  # [S]
        if touched.numel() == 0:
            return
        k = self.k
        b = best.shape[0]
        vals = torch.cat([s.top_vals[p, touched], best[:, touched].T], dim=1)  # [S, K+b]
        ids = torch.cat([s.top_ids[p, touched], seq_ids[None, :].expand(touched.numel(), b)], dim=1)
        pick = _top_rows(vals, ids, k)  # [S, K] columns of the new top-K
        kept = torch.zeros(vals.shape, dtype=torch.bool, device=vals.device).scatter_(1, pick, True)
        # Per row, as many old slots are evicted as new sequences enter; nonzero() lists
        # both row by row, so the i-th freed slot receives the i-th entering sequence.
        _, slot = torch.nonzero(~kept[:, :k], as_tuple=True)
        row, new = torch.nonzero(kept[:, k:], as_tuple=True)
        if row.numel() == 0:
            return
        feat = touched[row]
        s.top_vals[p, feat, slot] = best[new, feat]
        s.top_ids[p, feat, slot] = seq_ids[new]
        step = 1 << 16  # rows of per-token activations copied at a time (the first batch fills every slot)
        for a in range(0, feat.numel(), step):
            f, sl, nw = feat[a : a + step], slot[a : a + step], new[a : a + step]
            s.top_acts[p, f, sl] = acts[nw, f].to(torch.float16)

    def _feature_blocks(self):
        """(start, stop) blocks of :data:`FEATURE_BLOCK` features: dense steps go block by block,
        so their temporary tensors stay a block's size whatever the model's width."""
        return [(a, min(a + FEATURE_BLOCK, self.f)) for a in range(0, self.f, FEATURE_BLOCK)]

    def _set_best(self, p: int, vals: torch.Tensor, ids: torch.Tensor, acts: torch.Tensor, a: int = 0) -> None:
        """Polarity ``p``'s top lists of features ``a, a+1, …`` := the K best columns of
        (vals, ids, acts) [f, C(, T)], ordered by value descending, then sequence id ascending."""
        s = self.state
        e = a + vals.shape[0]
        pick = _top_rows(vals, ids, self.k)
        s.top_vals[p, a:e], s.top_ids[p, a:e] = vals.gather(1, pick), ids.gather(1, pick)
        s.top_acts[p, a:e] = acts.gather(1, pick[:, :, None].expand(-1, -1, self.t))

    def _sort_slots(self) -> None:
        """Order every top list (kept in arrival order while streaming)."""
        s = self.state
        for p in (0, 1):
            for a, e in self._feature_blocks():
                self._set_best(p, s.top_vals[p, a:e], s.top_ids[p, a:e], s.top_acts[p, a:e], a)

    # -- token extremes ---------------------------------------------------------------
    def _update_ext(self, p: int, best: torch.Tensor, body: torch.Tensor, sign: float) -> None:
        """Keep token values that beat the current M-th. A sequence whose max does not
        beat it has no such token, so only (sequence, neuron) pairs with ``best > thr``
        are read. best [b, F]; body [b, F, T'] unsigned."""
        s = self.state
        thr = s.ext[p, :, -1]
        for a, e in self._feature_blocks():  # a block at a time: the early batches offer most tokens
            if int(s.n_tokens) == 0:  # empty state: a dense top-M of the first batch
                flat = (sign * body[:, a:e]).permute(1, 0, 2).reshape(e - a, -1)  # [f, b·T']
                top = torch.topk(flat, min(self.m, flat.shape[1]), dim=1).values
                s.ext[p, a:e, : top.shape[1]] = top
                continue
            bi, fi = torch.nonzero(best[:, a:e] > thr[None, a:e], as_tuple=True)
            if fi.numel() == 0:
                continue
            fi += a
            vals = body[bi, fi]  # [P, T'], contiguous rows
            if sign < 0:
                vals.neg_()
            r, c = torch.nonzero(vals > thr[fi][:, None], as_tuple=True)
            self._pool[p][0].append(fi[r])
            self._pool[p][1].append(vals[r, c].float())  # exact from bf16; ext is float32
            self._pool_size[p] += r.numel()
            if self._pool_size[p] > self.pool_limit:
                self._compact(p)

    def _compact(self, p: int) -> None:
        """Merge pooled candidates into ``ext``: per feature, top-M of old ∪ new.

        Candidates are grouped by feature in order of how many each feature has, so a
        block of rows padded to its longest row wastes little (counts are skewed: a few
        features have several times the mean)."""
        feats, vals = self._pool[p]
        self._pool[p] = ([], [])
        self._pool_size[p] = 0
        if not feats:
            return
        f, v = torch.cat(feats), torch.cat(vals)
        cnt = torch.bincount(f, minlength=self.f)
        by_count = torch.argsort(cnt)[int((cnt == 0).sum()) :]  # features with candidates, fewest first
        row_of = torch.empty(self.f, dtype=torch.long, device=f.device)
        row_of[by_count] = torch.arange(by_count.numel(), device=f.device)
        row = row_of[f]
        order = torch.sort(row).indices
        row, v = row[order], v[order]
        counts = cnt[by_count]  # ascending
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(row.numel(), device=f.device) - torch.repeat_interleave(starts, counts)
        n_rows, a = by_count.numel(), 0
        while a < n_rows:
            e = min(n_rows, a + 8192)
            e = min(e, a + max(1, 8_000_000 // (int(counts[e - 1]) + self.m)))
            lo, hi = int(starts[a]), int(starts[e - 1] + counts[e - 1])
            pad = torch.full((e - a, int(counts[e - 1])), -math.inf, device=self.device)
            pad[row[lo:hi] - a, rank[lo:hi]] = v[lo:hi]
            u = by_count[a:e]
            self.state.ext[p, u] = torch.topk(torch.cat([self.state.ext[p, u], pad], dim=1), self.m, dim=1).values
            a = e

    def flush(self) -> None:
        """Fold pending extreme candidates into the state and sort the top lists
        (before saving or reading it)."""
        for p in (0, 1):
            self._compact(p)
        self._sort_slots()

    def update(self, seq_ids: torch.Tensor, acts: torch.Tensor) -> None:
        """Fold one batch in. ``seq_ids`` [b]; ``acts`` [b, F, T], feature-major, so a
        neuron's activations over a sequence are one contiguous row."""
        acts = acts.to(self.device)
        body = acts[:, :, self.skip :]
        self._fold(seq_ids, acts, body.amax(dim=-1), body.amin(dim=-1).neg_())

    def update_layers(self, seq_ids: torch.Tensor, per_layer: list[torch.Tensor]) -> None:
        """Fold one batch in from the hooks' per-layer ``[b, T, N]`` activations.

        Each layer is transposed into a reused feature-major buffer (feature
        ``f = layer × N + neuron``) and its per-sequence max/min are taken while it is
        still in cache; reusing the buffer avoids page-faulting a fresh one per batch.
        The buffer keeps the activations' dtype (bf16 under autocast: half the memory;
        every comparison and conversion from it is exact, as from a float32 copy), and
        each entry of ``per_layer`` is set to None once copied, so the caller's tensors
        are freed before the fold."""
        b, t, n = per_layer[0].shape
        shape, dtype = (b, n * len(per_layer), t), per_layer[0].dtype
        if self._buf is None or self._buf[0].shape != shape or self._buf[0].dtype != dtype:
            self._buf = None
            self._buf = (torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape[:2], device=self.device),
                         torch.empty(shape[:2], device=self.device))
        acts, mx, mn = self._buf
        for i in range(len(per_layer)):
            x = per_layer[i]
            cols = slice(i * n, (i + 1) * n)
            acts[:, cols] = x.transpose(1, 2)
            body = x[:, self.skip :]
            mx[:, cols] = body.amax(dim=1)
            mn[:, cols] = body.amin(dim=1)
            per_layer[i] = x = body = None
        self._fold(seq_ids, acts, mx, mn.neg_())

    def _fold(self, seq_ids: torch.Tensor, acts: torch.Tensor, best_max: torch.Tensor, best_neg_min: torch.Tensor) -> None:
        s = self.state
        seq_ids = seq_ids.to(self.device).long()
        body = acts[:, :, self.skip :]  # [b, F, T − skip]
        for p, sign, best in ((0, 1.0, best_max), (1, -1.0, best_neg_min)):
            self._update_top(p, best, seq_ids, acts)
            self._update_ext(p, best, body, sign)
        s.n_tokens += int(body.shape[0] * body.shape[2])
        hit = torch.isin(s.random_ids, seq_ids.cpu())
        if hit.any():
            pos = {int(x): j for j, x in enumerate(seq_ids.tolist())}
            for r in torch.nonzero(hit).flatten().tolist():
                s.random_acts[r] = acts[pos[int(s.random_ids[r])]].T.to(torch.float16).cpu()
                s.random_seen[r] = True

    def merge(self, other: "Collector") -> None:
        """Fold another shard's state into this one (exact)."""
        self.flush()
        other.flush()
        s, o = self.state, other.state
        for p in (0, 1):
            for a, e in self._feature_blocks():
                vals = torch.cat([s.top_vals[p, a:e], o.top_vals[p, a:e].to(self.device)], dim=1)
                ids = torch.cat([s.top_ids[p, a:e], o.top_ids[p, a:e].to(self.device)], dim=1)
                acts = torch.cat([s.top_acts[p, a:e], o.top_acts[p, a:e].to(self.device)], dim=1)
                self._set_best(p, vals, ids, acts, a)
                s.ext[p, a:e] = torch.topk(torch.cat([s.ext[p, a:e], o.ext[p, a:e].to(self.device)], dim=1),
                                           self.m, dim=1).values
        s.n_tokens += o.n_tokens
        s.random_acts[o.random_seen] = o.random_acts[o.random_seen]
        s.random_seen |= o.random_seen

    def _row_blocks(self, bytes_per_row: int, total: int | None = None):
        """(start, stop) blocks of rows (features, or random sequences) of about
        :data:`IO_BLOCK_BYTES` each: save and load convert one block at a time."""
        total = self.f if total is None else total
        step = max(1, IO_BLOCK_BYTES // max(1, bytes_per_row))
        return [(a, min(a + step, total)) for a in range(0, total, step)]

    def save(self, path, meta: dict | None = None) -> None:
        """Write the state as a Parquet shard, atomically (temporary file, then rename).

        One row per feature ``f``: ``top_vals`` [2K], ``top_ids`` [2K], ``top_acts`` (raw
        float16 bits of ``[2, K, T]``) and ``ext`` [2M]; counters in the schema metadata.
        The random sample's activations go to a second Parquet file, ``<path>.random``, one
        row per random sequence. Both are written a block of rows at a time (one row group
        each), so saving never copies the whole state.
        """
        import json
        import os

        import pyarrow as pa
        import pyarrow.parquet as pq

        self.flush()
        s = self.state
        k, m, t = self.k, self.m, self.t

        def fixed(arr, typ):
            return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), type=typ), arr.shape[1])

        def block(a: int, b: int) -> pa.Table:
            n = b - a
            return pa.table({
                "feature": pa.array(np.arange(a, b, dtype=np.int32)),
                "top_vals": fixed(s.top_vals[:, a:b].permute(1, 0, 2).reshape(n, 2 * k).cpu().numpy(), pa.float32()),
                "top_ids": fixed(s.top_ids[:, a:b].permute(1, 0, 2).reshape(n, 2 * k).cpu().numpy(), pa.int64()),
                "top_acts": fixed(s.top_acts[:, a:b].permute(1, 0, 2, 3).reshape(n, 2 * k * t).cpu().numpy().view(np.uint16),
                                  pa.uint16()),  # [n, 2·K·T] float16 bits
                "ext": fixed(s.ext[:, a:b].permute(1, 0, 2).reshape(n, 2 * m).cpu().numpy(), pa.float32()),
            })

        info = {"k": k, "m": m, "t": t, "f": self.f, "skip": self.skip,
                "n_tokens": int(s.n_tokens), "next_batch": int(s.next_batch),
                "random_ids": s.random_ids.tolist(), "random_seen": s.random_seen.tolist(), **(meta or {})}
        r = len(s.random_ids)
        rnd = s.random_acts.reshape(r, t * self.f).numpy().view(np.uint16)  # [R, T·F], a view
        parts = (
            (f"{path}.random", "zstd", pa.schema([("random_acts", pa.list_(pa.uint16(), t * self.f) if r else pa.list_(pa.uint16()))]),
             [(a, b, lambda a, b: pa.table({"random_acts": fixed(rnd[a:b], pa.uint16())}))
              for a, b in self._row_blocks(2 * t * self.f, r)]),
            (str(path), "none", block(0, 0).schema.with_metadata({"monitor.collector": json.dumps(info)}),
             [(a, b, block) for a, b in self._row_blocks(8 * k + 16 * k + 4 * k * t + 8 * m)]),
        )
        for dest, compression, schema, blocks in parts:
            tmp = f"{dest}.tmp"
            with pq.ParquetWriter(tmp, schema, compression=compression) as w:
                for a, b, make in blocks:
                    w.write_table(make(a, b), row_group_size=b - a)
            os.replace(tmp, dest)

    @staticmethod
    def read_info(path) -> dict:
        import json

        import pyarrow.parquet as pq

        return json.loads(pq.read_schema(path).metadata[b"monitor.collector"])

    @classmethod
    def load(cls, path, device="cpu", ext: bool = True) -> "Collector":
        """Read a state written by :meth:`save`, one row group at a time into the state's own
        tensors (no whole-state copy). ``ext=False`` skips the token extremes (``state.ext``
        is then empty and :meth:`quantiles` unavailable): what the exemplar readers need."""
        import pyarrow.parquet as pq

        info = cls.read_info(path)
        k, m, t, f = info["k"], info["m"], info["t"], info["f"]
        c = cls(f, t, k, m if ext else 0, info["random_ids"], info["skip"], device=device, allocate=False)
        dev, s = c.device, c.state
        s.top_vals = torch.empty((2, f, k), device=dev)
        s.top_ids = torch.empty((2, f, k), dtype=torch.long, device=dev)
        s.top_acts = torch.empty((2, f, k, t), dtype=torch.float16, device=dev)
        s.ext = torch.empty((2, f, c.m), device=dev)
        parts = {"top_vals": (s.top_vals, np.float32), "top_ids": (s.top_ids, np.int64),
                 "top_acts": (s.top_acts, np.float16), **({"ext": (s.ext, np.float32)} if ext else {})}

        def rows(column, dtype, shape: tuple, swap: bool) -> torch.Tensor:
            """A row group's column as one writable block of ``shape`` (rows first; with ``swap``
            the first two axes exchanged, the state's [2, rows, ...] layout)."""
            flat = np.ascontiguousarray(column.combine_chunks().flatten().to_numpy(zero_copy_only=False)).view(dtype)
            arr = flat.reshape(shape)
            return torch.from_numpy(np.array(arr.swapaxes(0, 1) if swap else arr, order="C"))  # a block-sized copy

        pf = pq.ParquetFile(path)
        a = 0
        for g in range(pf.num_row_groups):
            tab = pf.read_row_group(g, columns=list(parts))
            n = tab.num_rows
            for name, (dest, dtype) in parts.items():
                dest[:, a : a + n] = rows(tab.column(name), dtype, (n, 2, *dest.shape[2:]), True).to(dev)
            a += n
        if a != f:
            raise ValueError(f"{path} holds {a} features, its metadata says {f}")
        r = len(s.random_ids)
        s.random_acts = torch.empty((r, t, f), dtype=torch.float16)
        if r:
            pr = pq.ParquetFile(f"{path}.random")
            a = 0
            for g in range(pr.num_row_groups):
                col = pr.read_row_group(g).column("random_acts")
                n = len(col)
                s.random_acts[a : a + n] = rows(col, np.float16, (n, t, f), False)
                a += n
        s.random_seen = torch.tensor(info["random_seen"], dtype=torch.bool)
        s.n_tokens = torch.tensor(info["n_tokens"])
        s.next_batch = torch.tensor(info["next_batch"])
        return c

    def quantiles(self, levels=QUANTILE_LEVELS) -> dict[float, torch.Tensor]:
        """Quantiles per neuron, ``{q: [F]}``, by linear interpolation between order statistics.

        With ``n`` values sorted ascending ``x_(0) ≤ … ≤ x_(n−1)``, the q-quantile is
        ``x_(⌊h⌋) + (h − ⌊h⌋)(x_(⌊h⌋+1) − x_(⌊h⌋))`` with ``h = q (n − 1)`` — numpy's
        default. An upper level reads the stored maxima at rank ``r = (1 − q)(n − 1)``
        from the top, ``top[⌊r⌋] + (r − ⌊r⌋)(top[⌊r⌋+1] − top[⌊r⌋])``; a lower level
        the stored minima the same way. A level needing more than ``M`` extremes raises.
        """
        self.flush()
        s = self.state
        n = int(s.n_tokens)
        out = {}
        for q in levels:
            p, r = (0, (1 - q) * (n - 1)) if q >= 0.5 else (1, q * (n - 1))
            lo = int(math.floor(r))
            frac = r - lo
            if lo + (1 if frac > 0 else 0) >= self.m:
                raise ValueError(f"quantile {q} needs {lo + 2} extremes, only {self.m} kept")
            a = s.ext[p, :, lo]
            v = a if frac == 0 else a + frac * (s.ext[p, :, lo + 1] - a)
            out[q] = v if p == 0 else -v
        return out
