"""Random neuron controls: sets that mirror a steering intervention but pick other neurons.

Provides :func:`random_control`, one random set matched per layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from .errors import MonitorError
from .steering import Intervention


def random_control(interventions: Sequence[Intervention], n_neurons: int, seed: int = 0,
                   label: str | None = None) -> list[Intervention]:
    """Random neurons mirroring ``interventions``: same mode, strength, token range and
    polarities, and the **same number of neurons per layer**, drawn uniformly without
    replacement from each layer's other neurons (never one the real interventions touch,
    never twice). ``numpy.random.default_rng(seed)``; same seed, same control.
    """
    rng = np.random.default_rng(seed)
    taken = {(int(l), int(n)) for iv in interventions for l, n, _ in iv.neurons}
    out = []
    for iv in interventions:
        by_layer: dict[int, list[int]] = {}
        for l, n, p in sorted(iv.neurons):
            by_layer.setdefault(int(l), []).append(int(p))
        picked = []
        for layer, pols in by_layer.items():
            pool = np.array([n for n in range(n_neurons) if (layer, n) not in taken])
            if len(pool) < len(pols):
                raise MonitorError(f"Layer {layer} has too few other neurons for a random control of {len(pols)}.")
            chosen = np.sort(rng.choice(pool, size=len(pols), replace=False))
            for n, p in zip(chosen.tolist(), pols):
                taken.add((layer, n))
                picked.append((layer, n, p))
        out.append(replace(iv, neurons=picked, label=label or f"random control (seed {seed})"))
    return out


