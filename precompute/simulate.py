"""Scoring descriptions by simulation: the offline token-match simulator (``offline-token-match-v2``).

The score of a description is the OpenAI (2023) / Transluce definition: the Pearson
correlation between the neuron's true activations and activations *simulated from the
description alone*, pooled over every token of some sequences (held out: the neuron's
test top exemplars plus the held-out random sequences; see :mod:`precompute.exemplar_view`,
which also removes the attention-sink position).

With an LLM endpoint configured, the LLM is the simulator (see ``precompute.llm``).
Offline, :class:`Simulator` is a cheaper, documented stand-in that reads only the
description text (before its "Output:" / "; promotes" part), clause by clause:

* ``Fires on 'a' after 'b', 'c' …`` (or ``Goes most negative on …``): each quoted token
  predicts 1.0 where a sequence token equals it, 0.5 where it matches after stripping
  spaces and case; ``after 'b'`` halves the prediction where the previous token is not
  (loosely) ``'b'``;
* ``also 'x', 'y'``: the same at half weight;
* ``context: w1, w2``: a prediction in a sequence that contains one of these words
  (as a word, case-insensitive) is multiplied by 1.5;
* a clause saying ``window start``: the first scored position predicts at least 1.

Every other clause (the corpus source, a quoted example, counts) predicts nothing, so the
words of a source label never raise a prediction. Activations are multiplied by the
polarity first, so the correlation measures the polarity the description is about.

A prediction that is constant over the pooled tokens (no named token occurs) has no
correlation: the score is ``None`` (stored as NULL), never 0, and the same holds when the
true activations are constant.

v1 (``offline-token-match-v1``) differed in three ways: it read position 0 (the sink),
treated every unquoted word of the first sentence (the source label's "bible", "verses"
too) as a context word, and scored a constant prediction as 0.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

SCORER_ID = "offline-token-match-v2"
SCORER_VERSION = "2"
SCORER_DESCRIPTION = ("Pearson r between true activations and activations simulated from the description's "
                      "quoted tokens (held-out top and random sequences, sink excluded); NULL when nothing is predicted")
QUOTED = re.compile(r"'([^']*)'(?:\s+after\s+'([^']*)')?")
WORD = re.compile(r"[A-Za-z][A-Za-z']{2,}")
CONTEXT_BOOST = 1.5


def unshow(q: str) -> str:
    """A quoted token back to its string (the explainers write newlines as \\n and ' as ’)."""
    return q.replace("\\n", "\n").replace("’", "'")


def loose(s: str) -> str:
    return s.strip().lower()


@dataclass
class Parsed:
    """What a description predicts: (token, weight, previous token or None) items, context words, flags."""

    items: list[tuple[str, float, str | None]] = field(default_factory=list)
    context: set[str] = field(default_factory=set)
    window_start: bool = False

    @property
    def empty(self) -> bool:
        return not self.items and not self.window_start


def parse(description: str) -> Parsed:
    """The clauses of a description that the simulator reads (see the module docstring)."""
    head = description.split(" Output:", 1)[0].split("; promotes", 1)[0]
    out = Parsed()
    for clause in head.split("; "):
        c = clause.strip()
        low = c.lower()
        if low.startswith(("fires on", "goes most negative on")):
            weight = 1.0
        elif low.startswith("also "):
            weight = 0.5
        elif low.startswith("context:"):
            out.context |= {w.lower() for w in WORD.findall(c.split(":", 1)[1])}
            continue
        else:
            if "window start" in low:
                out.window_start = True
            continue
        if "window start" in low:
            out.window_start = True
        for tok, prev in QUOTED.findall(c):
            out.items.append((unshow(tok), weight, unshow(prev) if prev else None))
    return out


class Simulator:
    """Simulates descriptions over windows of token ids; ``strings`` maps token id → decoded string.

    ``word_sets`` (optional) maps a sequence id → its lower-case words, for the context boost;
    by default the words are read from the windows' token strings.
    """

    def __init__(self, strings: dict[int, str]):
        self.exact: dict[str, list[int]] = {}
        self.loose: dict[str, list[int]] = {}
        for i, s in strings.items():
            self.exact.setdefault(s, []).append(int(i))
            self.loose.setdefault(loose(s), []).append(int(i))
        self._words: dict[int, frozenset] = {}

    @classmethod
    def of_corpus(cls, corpus) -> "Simulator":
        ids = np.asarray(corpus.token_ids)
        strings: dict[int, str] = {}
        for row_ids, row_toks in zip(ids, corpus.tokens):
            for i, t in zip(row_ids.tolist(), row_toks):
                strings.setdefault(i, t)
        return cls(strings)

    def _ids(self, tok: str) -> tuple[np.ndarray, np.ndarray]:
        exact = self.exact.get(tok, [])
        near = [i for i in self.loose.get(loose(tok), []) if i not in exact] if loose(tok) else []
        return np.asarray(exact, np.int64), np.asarray(near, np.int64)

    def words(self, seq_id: int, tokens: list[str]) -> frozenset:
        w = self._words.get(seq_id)
        if w is None:
            w = self._words[seq_id] = frozenset(x.lower() for x in WORD.findall("".join(tokens)))
        return w

    @staticmethod
    def _match(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """bool mask of ``ids`` in ``wanted`` (a few ids: one comparison each, cheaper than np.isin)."""
        if len(wanted) > 8:
            return np.isin(ids, wanted)
        out = np.zeros(ids.shape, bool)
        for w in wanted.tolist():
            out |= ids == w
        return out

    def _hit(self, ids: np.ndarray, tok: str, prev: str | None) -> np.ndarray:
        """One quoted item's prediction before its weight: 1 exact, 0.5 loose, halved off its previous token."""
        exact, near = self._ids(tok)
        hit = self._match(ids, exact).astype(np.float32)
        if len(near):
            hit += 0.5 * self._match(ids, near)
        if prev is not None and hit.any():
            pe, pn = self._ids(prev)
            ok = np.zeros(ids.shape, bool)
            ok[:, 1:] = self._match(ids[:, :-1], np.concatenate([pe, pn]))
            hit = np.where(ok, hit, 0.5 * hit)
        return hit

    def predict(self, p: Parsed, windows, cache: dict | None = None) -> np.ndarray:
        """Simulated activations float32 ``[m, T']`` for :class:`~precompute.exemplar_view.Windows`
        (``cache`` reuses items' matches across descriptions simulated on the same windows)."""
        ids = windows.token_ids
        out = np.zeros(ids.shape, np.float32)
        if p.empty or ids.size == 0:
            return out
        cache = {} if cache is None else cache
        for tok, weight, prev in p.items:
            hit = cache.get((tok, prev))
            if hit is None:
                hit = cache[(tok, prev)] = self._hit(ids, tok, prev)
            np.maximum(out, weight * hit, out=out)
        if p.window_start:
            out[:, 0] = np.maximum(out[:, 0], 1.0)
        if p.context:
            boost = [bool(p.context & self.words(s, t)) for s, t in zip(windows.seq_ids, windows.tokens)]
            out[np.asarray(boost, bool)] *= CONTEXT_BOOST
        return out

    def score(self, description: str, polarity: int, windows) -> float | None:
        """Simulation score: ``pearson(polarity × acts, predict(parse(description)))``; None = no prediction."""
        return pearson(polarity * windows.acts, self.predict(parse(description), windows))

    def scores(self, descriptions: list[str], polarity: int, windows) -> list[float | None]:
        """:meth:`score` of several descriptions on the same windows (one batched correlation)."""
        if not descriptions:
            return []
        cache: dict = {}
        sims = np.stack([self.predict(parse(d), windows, cache) for d in descriptions])  # [C, m, T']
        return pearson_rows(polarity * windows.acts, sims)


def pearson(true: np.ndarray, sim: np.ndarray) -> float | None:
    """Pearson r over all cells; None when either side is constant (undefined, not 0)."""
    return pearson_rows(true, np.asarray(sim)[None])[0]


def pearson_rows(true: np.ndarray, sims: np.ndarray) -> list[float | None]:
    """r(true, sims[c]) for each c, over all cells: ``Σ(a−ā)(b−b̄) / √(Σ(a−ā)² Σ(b−b̄)²)``; None if undefined."""
    a = np.asarray(true, dtype=np.float64).ravel()
    b = np.asarray(sims, dtype=np.float64).reshape(len(sims), -1)
    if a.size == 0:
        return [None] * len(b)
    a = a - a.mean()
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum() * (b * b).sum(axis=1))
    num = b @ a
    tol = 1e-12 * max(1.0, float(np.abs(a).max()))
    return [float(n / d) if d > tol else None for n, d in zip(num, den)]
