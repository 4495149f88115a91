"""The exemplar view: which of a neuron's stored sequences are train, test and random.

Provides:

* :data:`TEST_EVERY`: top-exemplar ranks ``r`` with ``r % 4 == 3`` are held out (``test``),
  the rest are ``train``; :func:`split_of`, :func:`train_ranks`, :func:`test_ranks`;
* :class:`ExemplarView`: the merged collector state of a build, read per (neuron, polarity):
  :meth:`~ExemplarView.train` (what an explainer sees) and :meth:`~ExemplarView.heldout`
  (what a description is scored on: the test top exemplars plus the random sequences).

The offline and LLM explainers, both scorers and the database writer all read exemplars
through this module, so "train", "test" and "held out" mean one thing everywhere.
"""

from __future__ import annotations

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


class ExemplarView:
    """Per-(neuron, polarity) exemplars of a merged collector (``Collector.state``) over a corpus.

    Activations are raw (not signed by polarity), float32 ``[sequences, tokens]``; sequences
    whose slot is empty (fewer than K exemplars) are left out.
    """

    def __init__(self, state, k: int, corpus, n_neurons: int):
        self.s, self.corpus, self.n = state, corpus, int(n_neurons)
        self.train_ranks, self.test_ranks = train_ranks(k), test_ranks(k)
        self.random_tokens = [corpus.tokens[i] for i in state.random_ids.tolist()]
        self.random_acts = state.random_acts.float().numpy()  # [R, T, F]

    @classmethod
    def of_build(cls, build) -> "ExemplarView":
        col = build.merged()
        return cls(col.state, col.k, build.corpus, build.lm.n_neurons)

    def _top(self, polarity: int, f: int, ranks: list[int]) -> tuple[list[int], np.ndarray]:
        pi = 0 if polarity > 0 else 1
        ids = self.s.top_ids[pi, f, ranks].tolist()
        keep = [i for i, sid in enumerate(ids) if 0 <= sid < len(self.corpus)]
        return [ids[i] for i in keep], self.s.top_acts[pi, f][ranks][keep].float().numpy()

    def train(self, layer: int, neuron: int, polarity: int) -> tuple[list[list[str]], np.ndarray, list[str]]:
        """(tokens, acts ``[n, T]``, corpus sources) of the train top exemplars."""
        ids, acts = self._top(polarity, layer * self.n + neuron, self.train_ranks)
        return [self.corpus.tokens[i] for i in ids], acts, [self.corpus.sources[i] for i in ids]

    def heldout(self, layer: int, neuron: int, polarity: int) -> tuple[list[list[str]], np.ndarray]:
        """(tokens, acts ``[m, T]``) of the held-out sequences: test top exemplars, then the random ones."""
        f = layer * self.n + neuron
        ids, acts = self._top(polarity, f, self.test_ranks)
        return [self.corpus.tokens[i] for i in ids] + self.random_tokens, \
            np.concatenate([acts, self.random_acts[:, :, f]])

    def features(self, layer: int, neurons, with_train: bool = True) -> Iterator[tuple]:
        """Yields (neuron, polarity, train tokens, train acts, held-out tokens, held-out acts) per
        neuron and polarity (train ones empty / None when ``with_train`` is False)."""
        for neuron in neurons:
            for _, pol in POLARITY_INDEX:
                if with_train:
                    train_toks, train_acts, _ = self.train(layer, neuron, pol)
                else:
                    train_toks, train_acts = [], None
                held_toks, held_acts = self.heldout(layer, neuron, pol)
                yield neuron, pol, train_toks, train_acts, held_toks, held_acts
