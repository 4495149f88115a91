"""Measured effects of suppressing neurons, and how well attribution predicted them (faithfulness).

A **group** is a set of cells ``(layer, token, neuron)`` of a trace. Suppressing it sets those
activations to 0 (the steering "suppress": ``replace`` with strength 0) in one forward pass, and
its **measured effect** is

    Δf(group) = f(a with the group's cells set to 0) − f(a)

for the trace's attribution objective ``f`` (:mod:`engine.attribution`: log p of the target, the
contrast with a distractor, or the answer-level difference). Attribution is the linear estimate
of that change: to first order ``Δf ≈ Σ_cells (0 − a) · ∂f/∂a = −Σ_cells A``
(:func:`predicted_effect`).

:func:`suppression_effects` measures many groups at once: every group is its own row of one
batch (its own cells zeroed by a per-row pre-hook on ``mlp.down_proj``), and token objectives
stop at the target position. The unsteered prompt runs once into a KV cache; groups are sorted
by their first suppressed token and each batch continues from a copy of that cache cropped
there. :func:`faithfulness` compares prediction and measurement for the
top attributed cells (and any extra groups, e.g. the linter's clusters) by rank correlation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import MonitorError

Cell = tuple[int, int, int]  # (layer, token, neuron)
DEFAULT_BATCH = 16


def predicted_effect(trace, cells: Sequence[Cell]) -> float:
    """The attribution's linear prediction of suppressing ``cells``: ``−Σ A[l, t, n]``."""
    if not trace.has_attribution:
        raise MonitorError("This trace has no attribution: pick a target token first.")
    if not cells:
        return 0.0
    idx = np.asarray(list(cells), dtype=np.int64)
    return -float(trace.cells("attributions", idx[:, 0], idx[:, 1], idx[:, 2]).astype(np.float64).sum())


def _row_hooks(lm, plan: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Pre-hooks that zero, per layer, the cells ``(rows, positions, neurons)`` of ``plan``."""
    handles = []
    for layer, (b, t, n) in plan.items():
        def hook(module, args, b=b, t=t, n=n):
            x = args[0].clone()
            x[b, t, n] = 0
            return (x,) + tuple(args[1:])

        handles.append(lm.layers[layer].mlp.down_proj.register_forward_pre_hook(hook))
    return handles


def suppression_effects(lm, trace, groups: Sequence[Sequence[Cell]], batch_size: int = DEFAULT_BATCH,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``[groups]`` float64: the measured ``Δf`` of suppressing each group of cells (module docstring).

    Measured on the model without the trace's own interventions (a steered trace raises).
    ``progress(n)`` is called after each batch with the number of groups it measured.
    """
    from transformers import DynamicCache

    obj = getattr(trace, "objective", None)
    if obj is None:
        raise MonitorError("This trace has no attribution objective: pick a target token first.")
    if trace.interventions:
        raise MonitorError("Suppression effects are measured on the unsteered model: trace without steering.")
    n = len(trace.rendered)
    ids = trace.rendered.input_ids.to(lm.device)
    stop = obj.target_index if obj.target_index is not None else n  # later tokens cannot move f
    groups = [[(int(l), int(t), int(nn)) for l, t, nn in g] for g in groups]
    for g in groups:
        for l, t, nn in g:
            if not (0 <= l < lm.n_layers and 0 <= t < n and 0 <= nn < lm.n_neurons):
                raise MonitorError(f"Cell (layer {l}, token {t}, neuron {nn}) is outside this trace.")
    rows = obj.rows(ids[:stop] if obj.target_index is not None else ids)  # [R, T']
    R = rows.shape[0]
    last_start = stop - 1  # at least one token runs after the cache (its logits are read)
    # group 0: nothing suppressed (the baseline f); each group may start at its first suppressed token
    todo = [(last_start, -1, [])] + [
        (min([t for _, t, _ in g if t < stop] + [last_start]), i, g) for i, g in enumerate(groups)]
    todo.sort(key=lambda x: (x[0], x[1]))  # batches of neighbouring starts share one cropped cache
    head_mod = lm.model.get_output_embeddings()
    out = np.zeros(len(groups) + 1)
    with lm.lock, torch.inference_mode():
        full = None
        if last_start > 0:
            full = DynamicCache()  # the unsteered prompt once; every batch crops a copy of it
            lm.model.model(input_ids=rows[:1, :last_start], cache=full, use_cache=True)
        for b0 in range(0, len(todo), batch_size):
            part = todo[b0:b0 + batch_size]
            start = part[0][0]
            plan: dict[int, list[list[int]]] = {}
            for gi, (_, _, g) in enumerate(part):
                for l, t, nn in g:
                    if t >= stop:
                        continue
                    e = plan.setdefault(l, [[], [], []])
                    for r in range(R):
                        e[0].append(gi * R + r)
                        e[1].append(t - start)
                        e[2].append(nn)
            tensors = {l: tuple(torch.tensor(v, dtype=torch.long, device=lm.device) for v in e) for l, e in plan.items()}
            batch = rows[:, start:].repeat(len(part), 1)  # [G·R, T' − start]
            cache = None
            if start > 0:
                cache = copy.deepcopy(full)
                if start < last_start:
                    cache.crop(start - last_start)  # transformers: a negative count drops that many tokens
                cache.batch_repeat_interleave(len(part) * R)
            handles = _row_hooks(lm, tensors)
            try:
                hidden = lm.model.model(input_ids=batch, cache=cache, use_cache=cache is not None).last_hidden_state
            finally:
                for h in handles:
                    h.remove()
            values = obj.values(hidden, head_mod, n, offset=start).double().cpu().numpy()
            for (_, i, _), v in zip(part, values):
                out[i + 1] = v
            if progress is not None:
                progress(sum(1 for _, i, _ in part if i >= 0))
    return out[1:] - out[0]


@dataclass
class Faithfulness:
    """Predicted (linear) vs measured effects of suppressing groups, and their agreement."""

    rows: list[dict] = field(default_factory=list)  # {group, kind, cells, predicted, measured}
    spearman: float = float("nan")  # rank correlation of predicted and measured over all rows
    pearson: float = float("nan")

    def to_dict(self) -> dict:
        return {"spearman": self.spearman, "pearson": self.pearson, "rows": self.rows}


def faithfulness(lm, trace, k: int = 20, extra: Sequence[tuple[str, Sequence[Cell]]] = (),
                 skip_tokens: Sequence[int] = (0,), batch_size: int = DEFAULT_BATCH,
                 progress: Callable[[int], None] | None = None) -> Faithfulness:
    """Suppress each of the top-``k`` attribution cells (tokens in ``skip_tokens`` left out), and each
    named group of ``extra``, one at a time; compare ``−Σ A`` with the measured ``Δf``.

    ``spearman`` is scipy's rank correlation over all groups (NaN with fewer than 3 or when
    either side is constant)."""
    from scipy.stats import pearsonr, spearmanr

    if not trace.has_attribution:
        raise MonitorError("This trace has no attribution: pick a target token first.")
    if int(k) < 1 and not extra:
        raise MonitorError("Faithfulness needs at least one neuron: k must be at least 1.")
    top = trace.top_cells("attributions", max(int(k), 0), skip_tokens) if int(k) > 0 else []
    named: list[tuple[str, str, list[Cell]]] = []
    for c in top:
        layer, tok, neuron = c["layer"], c["token_index"], c["neuron"]
        named.append((f"L{layer}/N{neuron} @ token {tok}", "neuron", [(layer, tok, neuron)]))
    named += [(str(name), "cluster", [tuple(c) for c in cells]) for name, cells in extra]
    measured = suppression_effects(lm, trace, [c for _, _, c in named], batch_size, progress)
    rows = [{"group": name, "kind": kind, "cells": len(cells), "predicted": predicted_effect(trace, cells),
             "measured": float(m)} for (name, kind, cells), m in zip(named, measured)]
    out = Faithfulness(rows)
    pred = np.array([r["predicted"] for r in rows])
    meas = np.array([r["measured"] for r in rows])
    if len(rows) >= 3 and np.ptp(pred) > 0 and np.ptp(meas) > 0:
        out.spearman = float(spearmanr(pred, meas).statistic)
        out.pearson = float(pearsonr(pred, meas).statistic)
    return out
