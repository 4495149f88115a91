"""Random neuron controls: sets that mirror a steering intervention but pick other neurons.

Provides:

* :func:`activation_mass`: how much each neuron is active on the steered tokens of some prompts,
  ``[layers, neurons]`` (what suppressing it would remove);
* :func:`matched_controls`: ``n`` random sets, each with the same mode, strength, token range and
  polarities as the interventions, the **same number of neurons per layer**, and, given the mass,
  neurons **matched on activation mass** within each layer;
* :func:`random_control`: one such set without mass matching.

A single random draw says little: random sets of the same size moved accuracy by ±10 points on
their own in our runs. Experiments therefore draw ≥ 20 (:mod:`engine.experiments`) and report
where the concept falls among them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from .errors import MonitorError
from .steering import Intervention, TokenRange


def activation_mass(lm, chats: Sequence, view=None, tokens: TokenRange | None = None,
                    batch_size: int = 16) -> np.ndarray:
    """``M[l, i] = mean over chats of Σ_{t ∈ steered tokens} |n[l, t, i]|``: float64 ``[layers, neurons]``.

    ``n`` is the activation divided by the neuron's extreme quantile when ``view`` (an
    :class:`~engine.activation_view.ActivationView`) is given, else the raw activation; the
    steered tokens are ``tokens`` (default: the last user turn) of each rendered chat.
    """
    import torch

    from .activation_view import normalise
    from .chat import render_chat
    from .hooks import NeuronHooks

    tokens = tokens or TokenRange()
    rendered = [render_chat(lm.tokenizer, c, add_generation_prompt=True, max_tokens=lm.max_context) for c in chats]
    if not rendered:
        raise MonitorError("No prompts to measure activation mass on.")
    total = torch.zeros(lm.n_layers, lm.n_neurons, dtype=torch.float64)
    by_len: dict[int, list] = {}
    for r in rendered:
        by_len.setdefault(len(r), []).append(r)
    for group in by_len.values():
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            ids = torch.stack([r.input_ids for r in part]).to(lm.device)  # [B, tokens]
            with lm.lock, torch.inference_mode(), NeuronHooks(lm, capture=True) as hooks:
                lm.model(input_ids=ids, logits_to_keep=1)
                acts = torch.stack([c.float() for c in hooks.captured], dim=1).cpu()  # [B, layers, tokens, neurons]
            for b, r in enumerate(part):
                pos = tokens.resolve(r)
                a = normalise(acts[b][:, pos, :], view) if view is not None else acts[b][:, pos, :]
                total += a.abs().sum(dim=1).double()
    return (total / len(rendered)).numpy()


def _by_layer(iv: Intervention) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for l, n, p in sorted(iv.neurons):
        out.setdefault(int(l), []).append((int(n), int(p)))
    return out


def matched_controls(interventions: Sequence[Intervention], n_neurons: int, n: int, seed: int = 0,
                     mass: np.ndarray | None = None, window: float = 0.05,
                     label: str = "random control") -> list[tuple[list[Intervention], dict]]:
    """``n`` random control sets for ``interventions``: ``[(interventions, info), …]``.

    Each set mirrors every intervention (mode, strength, token range, polarities) with other
    neurons of the same layers (never a neuron the real interventions touch, never twice in a set),
    drawn with ``numpy.random.default_rng(seed + i)`` for set ``i``. Without ``mass`` the draw is
    uniform within the layer. With ``mass`` (``[layers, neurons]``, :func:`activation_mass`) each
    real neuron, heaviest first, is matched by a random pick among the ``max(3, window × pool)``
    remaining neurons of its layer whose mass is closest to its own. ``info`` holds the seed and
    ``mass_ratio`` = Σ control mass / Σ real mass (1 is a perfect match; NaN without mass).
    """
    taken = {(int(l), int(nn)) for iv in interventions for l, nn, _ in iv.neurons}
    real_mass = sum(float(mass[l, nn]) for l, nn in taken) if mass is not None else float("nan")
    out = []
    for i in range(int(n)):
        rng = np.random.default_rng(seed + i)
        used = set(taken)
        ivs, ctrl_mass = [], 0.0
        for iv in interventions:
            picked = []
            for layer, members in _by_layer(iv).items():
                pool = np.array([nn for nn in range(n_neurons) if (layer, nn) not in used])
                if len(pool) < len(members):
                    raise MonitorError(f"Layer {layer} has too few other neurons for a random control of "
                                       f"{len(members)}.")
                if mass is None:
                    chosen = [int(c) for c in rng.choice(pool, size=len(members), replace=False)]
                else:
                    chosen = _match(members, pool, mass[layer], rng, window)
                for nn, (_, pol) in zip(chosen, members):
                    used.add((layer, nn))
                    picked.append((layer, nn, pol))
                    if mass is not None:
                        ctrl_mass += float(mass[layer, nn])
            ivs.append(replace(iv, neurons=sorted(picked), label=f"{label} (seed {seed + i})"))
        ratio = ctrl_mass / real_mass if mass is not None and real_mass > 0 else float("nan")
        out.append((ivs, {"seed": seed + i, "mass_ratio": ratio}))
    return out


def _match(members: list[tuple[int, int]], pool: np.ndarray, layer_mass: np.ndarray, rng, window: float) -> list[int]:
    """One pool neuron per member, each among the closest in mass (see :func:`matched_controls`)."""
    free = list(pool[np.argsort(layer_mass[pool], kind="stable")])  # ascending mass
    free_mass = [float(layer_mass[x]) for x in free]
    width = max(3, int(round(window * len(free))))
    chosen: dict[int, int] = {}
    for idx in sorted(range(len(members)), key=lambda j: -float(layer_mass[members[j][0]])):
        target = float(layer_mass[members[idx][0]])
        at = int(np.searchsorted(free_mass, target))
        lo, hi = max(0, at - width // 2), min(len(free), at - width // 2 + width)
        lo = max(0, min(lo, hi - width))
        k = int(rng.integers(lo, hi))
        chosen[idx] = int(free.pop(k))
        free_mass.pop(k)
    return [chosen[j] for j in range(len(members))]


def random_control(interventions: Sequence[Intervention], n_neurons: int, seed: int = 0,
                   label: str | None = None) -> list[Intervention]:
    """One random control (uniform within each layer): :func:`matched_controls` without mass."""
    ivs, _ = matched_controls(interventions, n_neurons, 1, seed)[0]
    if label is not None:
        ivs = [replace(iv, label=label) for iv in ivs]
    return ivs
