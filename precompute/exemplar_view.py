"""The exemplar view: which of a neuron's stored sequences are train, test and random, without the sink.

Provides:

* :data:`TEST_EVERY`: top-exemplar ranks ``r`` with ``r % 4 == 3`` are held out (``test``),
  the rest are ``train``; :func:`split_of`, :func:`train_ranks`, :func:`test_ranks`;
* :func:`random_split`: the shared random sequences (ranked by sequence id) alternate:
  even ranks are the explainer's ``train`` background, odd ranks are held out with the
  test exemplars (the exemplars table stores them all as split ``random``);
* :class:`Windows`: some sequences of one (neuron, polarity) with their token ids, token
  strings, activations and sources, **the first ``skip_prefix`` positions removed**;
* :class:`ExemplarView`: the merged collector state of a build, read per (neuron, polarity):
  :meth:`~ExemplarView.train` (what an explainer sees and picks its best candidate on) and
  :meth:`~ExemplarView.heldout` (what a description is scored on).

Position 0 is the attention sink (|a| ≈ 3,000 on a few neurons whatever the token): the
collector skips it when ranking exemplars, and every explainer and scorer reads exemplars
through this view, so none of them ever sees it. "train", "test", "held out" and "the
sink is excluded" mean one thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

TEST_EVERY = 4
POLARITY_INDEX = ((0, 1), (1, -1))  # (collector slot, polarity): slot 0 holds the top, slot 1 the bottom


def split_of(ranks: np.ndarray) -> np.ndarray:
    """``"test"`` for ranks ``r % TEST_EVERY == TEST_EVERY − 1``, else ``"train"``."""
    ranks = np.asarray(ranks)
    return np.where(ranks % TEST_EVERY == TEST_EVERY - 1, "test", "train")


def train_ranks(k: int) -> list[int]:
    return [r for r in range(k) if r % TEST_EVERY != TEST_EVERY - 1]


def test_ranks(k: int) -> list[int]:
    return [r for r in range(k) if r % TEST_EVERY == TEST_EVERY - 1]


def random_split(n_random: int) -> tuple[list[int], list[int]]:
    """(train ranks, held-out ranks) of the shared random sequences: even ranks, odd ranks.

    With a single random sequence it is held out (a score needs background more than a
    candidate choice does)."""
    if n_random < 2:
        return [], list(range(n_random))
    return list(range(0, n_random, 2)), list(range(1, n_random, 2))


@dataclass
class Windows:
    """Sequences of one (neuron, polarity): the first ``n_top`` are top exemplars, the rest random.

    Every per-position array starts at position ``skip_prefix`` of the sequence (the sink is gone).
    """

    seq_ids: list[int]
    tokens: list[list[str]]   # [m][T'] decoded token strings
    token_ids: np.ndarray     # int32 [m, T']
    acts: np.ndarray          # float32 [m, T'], raw (not signed by polarity)
    sources: list[str]
    n_top: int

    def __len__(self) -> int:
        return len(self.seq_ids)


class ExemplarView:
    """Per-(neuron, polarity) exemplars of a merged collector (``Collector.state``) over a corpus.

    Activations are raw (not signed by polarity), float32; sequences whose slot is empty
    (fewer than K exemplars) are left out; the first ``skip_prefix`` positions are removed.
    """

    def __init__(self, state, k: int, corpus, n_neurons: int, skip_prefix: int = 1):
        self.s, self.corpus, self.n, self.skip = state, corpus, int(n_neurons), int(skip_prefix)
        self.train_ranks, self.test_ranks = train_ranks(k), test_ranks(k)
        rid = state.random_ids.tolist()
        tr, te = random_split(len(rid))
        self.random_train_ids, self.random_test_ids = [rid[r] for r in tr], [rid[r] for r in te]
        # [R, T', F] float16, a view (no copy): a float32 copy would be R·T'·F·4 bytes (2.3 GB at
        # 458,752 neurons and 40 × 31 positions); each key's rows are converted when read (exactly).
        self._random_acts = state.random_acts[:, self.skip:].numpy()
        self._random_train, self._random_test = np.asarray(tr, np.int64), np.asarray(te, np.int64)
        self.token_ids = np.asarray(corpus.token_ids)[:, self.skip:]  # [S, T']
        self._top_ids = state.top_ids.numpy()  # [2, F, K] (NumPy views: indexing them per key is cheaper)
        self._top_acts = state.top_acts.numpy()  # [2, F, K, T] float16

    @classmethod
    def of_build(cls, build) -> "ExemplarView":
        col = build.merged()
        return cls(col.state, col.k, build.corpus, build.model_facts()[1], build.cfg.skip_prefix)  # no weights loaded

    def _top(self, polarity: int, f: int, ranks: list[int]) -> tuple[list[int], np.ndarray]:
        pi = 0 if polarity > 0 else 1
        ids = self._top_ids[pi, f, ranks]
        keep = (ids >= 0) & (ids < len(self.corpus))
        return ids[keep].tolist(), self._top_acts[pi, f, ranks][keep][:, self.skip:].astype(np.float32)

    def _windows(self, ids: list[int], acts: np.ndarray, n_top: int) -> Windows:
        c = self.corpus
        return Windows(ids, [c.tokens[i][self.skip:] for i in ids], self.token_ids[ids],
                       np.ascontiguousarray(acts, dtype=np.float32), [c.sources[i] for i in ids], n_top)

    def train(self, layer: int, neuron: int, polarity: int, with_random: bool = False) -> Windows:
        """The train top exemplars (and, with ``with_random``, the train half of the random sequences)."""
        f = layer * self.n + neuron
        ids, acts = self._top(polarity, f, self.train_ranks)
        n_top = len(ids)
        if with_random:
            ids = ids + self.random_train_ids
            acts = np.concatenate([acts, self._random_acts[self._random_train, :, f].astype(np.float32)])
        return self._windows(ids, acts, n_top)

    def heldout(self, layer: int, neuron: int, polarity: int) -> Windows:
        """The held-out sequences: test top exemplars, then the held-out random ones."""
        f = layer * self.n + neuron
        ids, acts = self._top(polarity, f, self.test_ranks)
        return self._windows(ids + self.random_test_ids,
                             np.concatenate([acts, self._random_acts[self._random_test, :, f].astype(np.float32)]), len(ids))

    def features(self, layer: int, neurons, with_train: bool = True) -> Iterator[tuple]:
        """Yields (neuron, polarity, train tokens, train acts, held-out tokens, held-out acts) per
        neuron and polarity (train ones empty / None when ``with_train`` is False); sink removed."""
        for neuron in neurons:
            for _, pol in POLARITY_INDEX:
                if with_train:
                    tw = self.train(layer, neuron, pol)
                    train_toks, train_acts = tw.tokens, tw.acts
                else:
                    train_toks, train_acts = [], None
                hw = self.heldout(layer, neuron, pol)
                yield neuron, pol, train_toks, train_acts, hw.tokens, hw.acts
