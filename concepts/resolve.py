"""Concept → neurons through the neuron database: the one path from steering specs to interventions.

Provides:

* :func:`select` / :func:`select_all`: the neurons one spec picks (embed the concept, take the
  top-k (layer, neuron, polarity) descriptions by cosine, filters applied before the top-k);
* :func:`resolve` → :class:`Resolved`: select → union → quantiles → check, for every caller
  (the steering panel, the experiments page, the experiment CLI, the tests);
* :func:`steering_quantiles`: the ``{+1: Q(1−1e-7), −1: Q(1e-7)}`` tables *strengthen* needs;
* :func:`activation_view`: the database's :class:`~engine.activation_view.ActivationView`.

Nothing here writes to the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from engine.activation_view import NORM_QUANTILE, STEER_QUANTILE, ActivationView
from engine.errors import MonitorError
from engine.specs import ConceptSpec, Selection, SteeringUnion, union
from engine.steering import check_quantiles, needs_quantiles

EmbedFn = Callable[[str], np.ndarray]


def embed_one(text: str, embed_fn: EmbedFn | None = None) -> np.ndarray:
    """The unit embedding ``[d]`` of ``text`` (``embed_fn`` when given, else the project's embedder)."""
    if embed_fn is not None:
        return np.asarray(embed_fn(text), np.float32).reshape(-1)
    from cache.embedder import embed

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
    vec = embed_one(spec.concept, embed_fn)
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


def activation_view(db) -> ActivationView:
    """The floored ``Q(1−1e-5)`` / ``Q(1e-5)`` divisors of ``db`` (:mod:`engine.activation_view`)."""
    return ActivationView.from_quantiles(db.quantile_table(NORM_QUANTILE[1]), db.quantile_table(NORM_QUANTILE[-1]))


@dataclass
class Resolved:
    """Specs resolved against a database: what to pass to the engine, and what went wrong."""

    union: SteeringUnion
    quantiles: dict | None  # None unless a spec strengthens
    problems: list[str] = field(default_factory=list)  # "<spec label>: <error>" per spec left out (lenient mode)

    @property
    def selections(self) -> list[Selection]:
        return self.union.selections

    @property
    def interventions(self):
        return self.union.interventions


def resolve(db, specs: Sequence[ConceptSpec], embed_fn: EmbedFn | None = None, *, strict: bool = True,
            select_fn: Callable[[ConceptSpec], Selection] | None = None,
            quantiles_fn: Callable[[], dict] | None = None) -> Resolved:
    """Select every enabled spec, combine them with :func:`engine.specs.union`, load the
    quantile tables when an intervention needs them (a non-zero ``replace`` strength,
    :func:`engine.steering.needs_quantiles`) and check them.

    ``strict`` raises the first spec's error; otherwise that spec is left out and its error
    listed in ``problems``. ``select_fn`` / ``quantiles_fn`` replace :func:`select` and
    :func:`steering_quantiles` (the dashboard passes memoised ones).
    """
    pick = select_fn or (lambda s: select(db, s, embed_fn))
    sels, problems = [], []
    for spec in specs:
        if not spec.enabled:
            continue
        try:
            sels.append(pick(spec))
        except MonitorError as err:
            if strict:
                raise
            problems.append(f"{spec.label}: {err}")
    u = union(sels)
    quantiles = None
    if needs_quantiles(u.interventions):
        quantiles = quantiles_fn() if quantiles_fn is not None else steering_quantiles(db)
    check_quantiles(u.interventions, quantiles)
    return Resolved(u, quantiles, problems)
