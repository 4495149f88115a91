"""Scoring descriptions by simulation: the offline token-match simulator.

The score of a description is the OpenAI (2023) / Transluce definition: the Pearson
correlation between the neuron's true activations and activations *simulated from the
description alone*, pooled over every token of held-out sequences (the neuron's test
top exemplars plus a random sample of corpus sequences).

With an LLM endpoint configured, the LLM is the simulator (see ``precompute.llm``).
Offline, :func:`simulate` is a cheaper, documented stand-in that reads only the
description text:

* the quoted strings before "; promotes" are the tokens the description says it fires
  on; a token equal to one scores 1.0, equal after stripping spaces and case 0.5;
* the other content words before "; promotes" are context words; a token-match in a
  sequence that contains one of them is boosted ×1.5.

Everything else predicts 0. Activations are multiplied by the polarity first, so the
correlation measures the polarity the description is about.
"""

from __future__ import annotations

import re

import numpy as np

SCORER_ID = "offline-token-match-v1"
QUOTED = re.compile(r"'([^']*)'")
WORD = re.compile(r"[A-Za-z][A-Za-z']{2,}")
TEMPLATE_WORDS = {"fires", "goes", "most", "negative", "context", "mixed", "text", "mostly", "clear", "token", "and"}


def parse(description: str) -> tuple[set[str], set[str], set[str]]:
    """(exact tokens, normalised tokens, context words) named by a description."""
    head = description.split("; promotes", 1)[0]
    quoted = [q.replace("\\n", "\n").replace("’", "'") for q in QUOTED.findall(head)]
    rest = QUOTED.sub(" ", head)
    words = {w.lower() for w in WORD.findall(rest)} - TEMPLATE_WORDS
    return set(quoted), {q.strip().lower() for q in quoted if q.strip()}, words


def simulate(description: str, sequences: list[list[str]]) -> np.ndarray:
    """Simulated activations ``[n_sequences, T]`` in [0, 1.5] from the description alone."""
    exact, loose, words = parse(description)
    out = np.zeros((len(sequences), len(sequences[0]) if sequences else 0), dtype=np.float32)
    for i, toks in enumerate(sequences):
        text = "".join(toks).lower()
        boost = 1.5 if words and any(w in text for w in words) else 1.0
        for t, tok in enumerate(toks):
            if tok in exact:
                out[i, t] = boost
            elif tok.strip().lower() in loose:
                out[i, t] = 0.5 * boost
    return out


def pearson(true: np.ndarray, sim: np.ndarray) -> float:
    """Pearson r over all cells; 0.0 when either side is constant (undefined)."""
    a = np.asarray(true, dtype=np.float64).ravel()
    b = np.asarray(sim, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def score(description: str, polarity: int, acts: np.ndarray, sequences: list[list[str]]) -> float:
    """Simulation score of one description: ``pearson(polarity × acts, simulate(...))``. acts [n, T]."""
    return pearson(polarity * np.asarray(acts, dtype=np.float32), simulate(description, sequences))
