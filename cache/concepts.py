"""Concept → neurons through the neuron database, and the database side of the linter.

* :func:`select` resolves one :class:`~engine.concepts.ConceptSpec`: embed the concept
  (:func:`cache.embedder.embed`) and take the top-k (layer, neuron, polarity)
  descriptions by cosine with :meth:`NeuronDB.semantic_search` (layer range, polarity,
  minimum score and keyword filters applied before the top-k).
* :func:`resolve` does that for several specs and returns their
  :func:`engine.concepts.union`: deduplicated interventions plus the overlap report.
* :func:`steering_quantiles` / :func:`activation_scale` are the quantile tables steering
  and activation normalisation need.
* :func:`lint_trace` gathers a trace's important neurons' description embeddings and
  summaries, embeds the conversation, calibrates the spurious flag on random database
  descriptions, and runs :func:`engine.linter.lint`.

The dashboard calls these with its open :class:`~cache.db.NeuronDB`; nothing here writes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from engine.concepts import STEER_QUANTILE, ConceptSpec, Selection, SteeringUnion, check_quantiles, union
from engine.errors import MonitorError

EmbedFn = Callable[[str], np.ndarray]
DEFAULT_NULL_SIZE = 2000


def _embed_one(text: str, embed_fn: EmbedFn | None) -> np.ndarray:
    if embed_fn is not None:
        return np.asarray(embed_fn(text), np.float32).reshape(-1)
    from .embedder import embed

    return embed(text)[0]


def select(db, spec: ConceptSpec, embed_fn: EmbedFn | None = None) -> Selection:
    """The neurons ``spec`` picks in ``db``, most similar first.

    ``similarity = cos(embed(concept), description embedding)``. A spec with explicit
    ``neurons`` (e.g. from a linter cluster) is taken as is, after checking each neuron
    exists. Fewer than k rows come back when fewer descriptions pass the filters.
    """
    if spec.neurons is not None:
        for l, n, _ in spec.neurons:
            db.check_neuron(l, n)
        return Selection.explicit(spec)
    vec = _embed_one(spec.concept, embed_fn)
    hits = db.semantic_search(vec, k=spec.k, layer_range=spec.layer_range, polarity=spec.polarity,
                              min_score=spec.min_score, keyword=spec.keyword)
    if hits.empty:
        raise MonitorError(f"No neuron descriptions match {spec.concept!r} with these filters: loosen the keyword, "
                           "layer range or minimum score.")
    neurons = list(zip(hits["layer"].astype(int).tolist(), hits["neuron"].astype(int).tolist(),
                       hits["polarity"].astype(int).tolist()))
    return Selection(spec, neurons, hits["similarity"].astype(float).tolist(),
                     [str(s) for s in hits["summary"].tolist()])


def select_all(db, specs: Sequence[ConceptSpec], embed_fn: EmbedFn | None = None) -> list[Selection]:
    """:func:`select` for every enabled spec, in order."""
    return [select(db, s, embed_fn) for s in specs if s.enabled]


def steering_quantiles(db) -> dict[int, np.ndarray]:
    """{+1: Q(1−1e-7), −1: Q(1e-7)} tables ``[layers, neurons]`` for strengthen.

    The database stores a fixed set of quantiles; :meth:`NeuronDB.quantile_table` snaps
    to the nearest stored one, which for these tails is the corpus max and min.
    """
    return {p: db.quantile_table(q) for p, q in STEER_QUANTILE.items()}


def resolve(db, specs: Sequence[ConceptSpec], embed_fn: EmbedFn | None = None) -> tuple[SteeringUnion, dict | None]:
    """(union of the enabled specs' selections, quantile tables or None).

    The tables are loaded only when a spec strengthens; pass both to
    :func:`engine.generate.generate` / :func:`engine.trace.run_trace` as
    ``interventions=u.interventions, quantiles=q``.
    """
    u = union(select_all(db, specs, embed_fn))
    needs_q = any(iv.strength != 0 for iv in u.interventions)
    quantiles = steering_quantiles(db) if needs_q else None
    check_quantiles(u.interventions, quantiles)
    return u, quantiles


def activation_scale(db) -> tuple[np.ndarray, np.ndarray]:
    """(Q(1−1e-5), Q(1e-5)), each ``[layers, neurons]``: the activation-view normalisers."""
    from engine.linter import SCALE_QUANTILE

    return db.quantile_table(SCALE_QUANTILE[1]), db.quantile_table(SCALE_QUANTILE[-1])


def neuron_texts(db, keys: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, list[str | None]]:
    """(embeddings float32 [m, d], summaries [m]) of (layer, neuron, polarity) keys.

    Rows for keys without a description are zeros and their summary is None.
    """
    m = len(keys)
    index = db.index
    out = np.zeros((m, index.dim), np.float32)
    if m == 0:
        return out, []
    arr = np.asarray(keys, np.int64).reshape(-1, 3)
    codes, ok = db.keys.codes(arr[:, 0], arr[:, 1], arr[:, 2])
    rows = np.where(ok, index.row_of[np.where(ok, codes, 0)], -1)
    out[rows >= 0] = index.mat[rows[rows >= 0]]
    pairs = [(int(l), int(n)) for l, n, _ in keys]
    table = db.descriptions_for(pairs) if pairs else None
    summaries: list[str | None] = []
    for i, (_, _, p) in enumerate(keys):
        if rows[i] < 0:
            summaries.append(None)
            continue
        col = "summary_pos" if int(p) > 0 else "summary_neg"
        value = table[col].iloc[i]
        summaries.append(None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))
    return out, summaries


def random_description_vectors(db, n: int = DEFAULT_NULL_SIZE, seed: int = 0) -> np.ndarray:
    """``n`` description embeddings drawn uniformly without replacement (seeded): [n, d]."""
    index = db.index
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), size=min(int(n), len(index)), replace=False)
    return index.mat[np.sort(rows)]


def lint_trace(db, trace, mode: str = "attribution", k: int | None = None, threshold: float | None = None,
               min_size: int | None = None, percentile: float | None = None, labeler="env",
               embed_fn: EmbedFn | None = None, null_size: int = DEFAULT_NULL_SIZE, seed: int = 0,
               progress=None):
    """Run the concept linter on ``trace`` against ``db``; returns an :class:`engine.linter.LintReport`.

    ``labeler="env"`` uses :meth:`engine.linter.LLMLabeler.from_env` (offline labels when
    the variables are unset); pass None for offline labels, or an ``LLMLabeler``.
    The spurious threshold is calibrated per conversation on ``null_size`` random
    descriptions of this database (seeded).
    """
    from engine import linter

    k = linter.DEFAULT_TOP_K if k is None else k
    scale = activation_scale(db) if mode == "activation" else None
    hits = linter.important_neurons(trace, mode=mode, k=k, scale=scale)
    emb, summaries = neuron_texts(db, [h.key for h in hits])
    conv = _embed_one(linter.conversation_text(trace.rendered), embed_fn)
    calibration = linter.RelevanceCalibration.from_vectors(
        conv, random_description_vectors(db, null_size, seed),
        linter.DEFAULT_PERCENTILE if percentile is None else percentile)
    if labeler == "env":
        labeler = linter.LLMLabeler.from_env()
    return linter.lint(
        hits, emb, [s or "" for s in summaries], mode=mode,
        threshold=linter.DEFAULT_THRESHOLD if threshold is None else threshold,
        min_size=linter.DEFAULT_MIN_SIZE if min_size is None else min_size,
        calibration=calibration, labeler=labeler, progress=progress)
