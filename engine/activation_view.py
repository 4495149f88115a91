"""The activation view: a live activation measured against the neuron's usual extremes.

Provides:

* :data:`NORM_QUANTILE`: the quantiles a value is divided by, ``{+1: 1 − 1e-5, −1: 1e-5}``;
* :data:`STEER_QUANTILE`: the quantiles *strengthen* multiplies, ``{+1: 1 − 1e-7, −1: 1e-7}``;
* :func:`quantile_scales`: the divisors ``(s⁺, s⁻)`` from the quantile tables, floored;
* :class:`ActivationView`: those divisors, and :meth:`~ActivationView.normalise`;
* :func:`normalise`: ``n[layers, tokens, neurons]`` (raw values without a view);
* :func:`neuron_extremes`: per neuron, the token where ``|n|`` is largest;
* :func:`salient_neurons`: the neurons at or beyond a threshold, one per neuron at its most
  extreme token (the chat table's rows, the linter's activation mode, the neuron page);
* :func:`top_cells`: the ``k`` (layer, token, neuron) cells with the largest ``|value|``;
* :func:`side_maxima` / :func:`extremes_from_sides`: the same extremes from a compact per-layer
  summary of raw activations (a trace too big to keep whole, :mod:`engine.trace`), for any view.

Every place that says "normalised activation" (the chat table, the concept linter, the
neuron page, the CLI) calls this module, so they agree on which neuron is "≥ 1".

The normalised value of neuron ``i`` in layer ``l`` at token ``t``::

    n[l,t,i] = a[l,t,i] / s⁺[l,i]   if a ≥ 0,     s⁺ = Q(1 − 1e-5)
    n[l,t,i] = a[l,t,i] / s⁻[l,i]   if a < 0,     s⁻ = −Q(1e-5)     (so n keeps a's sign)

so ``|n| ≥ 1`` means "at or beyond the neuron's extreme quantile". Token 0, the attention
sink (|a| ≈ 3,000 on SmolLM2 against ≈ 75 elsewhere), is left out by default.
Nothing here knows the database: the quantile tables are passed in as arrays.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

NORM_QUANTILE = {1: 1 - 1e-5, -1: 1e-5}
STEER_QUANTILE = {1: 1 - 1e-7, -1: 1e-7}
REL_FLOOR = 0.05  # a divisor is at least this fraction of its layer's median divisor …
ABS_FLOOR = 1e-4  # … and at least this
SINK = 0  # the attention-sink token


def quantile_scales(q_high: np.ndarray, q_low: np.ndarray, rel_floor: float = REL_FLOOR,
                    abs_floor: float = ABS_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Divisors ``(s⁺, s⁻)``, both positive float32 ``[layers, neurons]``, from the quantile tables.

    ``s⁺ = Q(1 − 1e-5)`` and ``s⁻ = −Q(1e-5)``. A neuron whose quantile is zero, tiny or of
    the wrong sign (it never went that way on the corpus) would blow a live value up to
    thousands, so each divisor is floored at ``max(abs_floor, rel_floor × median_l)``, where
    ``median_l`` is the median positive divisor of its layer. A neuron the database lacks
    (NaN) gets ``inf``: its normalised value is 0.
    """
    out = []
    for table in (np.asarray(q_high, np.float32), -np.asarray(q_low, np.float32)):
        s = table.copy()  # [layers, neurons]
        known = np.isfinite(s)
        pos = np.where(known & (s > 0), s, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a tail with no quantile at all (an import): all NaN
            med = np.nanmedian(pos, axis=1) if pos.size else np.zeros(0)
        med = np.where(np.isfinite(med), med, 0.0)
        floor = np.maximum(abs_floor, rel_floor * med)[:, None]  # [layers, 1]
        out.append(np.where(known, np.maximum(s, floor), np.inf).astype(np.float32))
    return out[0], out[1]


@dataclass(frozen=True)
class ActivationView:
    """The floored divisors of one neuron database: ``pos`` = s⁺, ``neg`` = s⁻, each ``[layers, neurons]``."""

    pos: np.ndarray
    neg: np.ndarray

    @classmethod
    def from_quantiles(cls, q_high: np.ndarray, q_low: np.ndarray) -> "ActivationView":
        """From the raw ``Q(1 − 1e-5)`` and ``Q(1e-5)`` tables (see :func:`quantile_scales`)."""
        return cls(*quantile_scales(q_high, q_low))

    @property
    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        return self.pos, self.neg

    def normalise(self, acts: torch.Tensor) -> torch.Tensor:
        """``n`` ``[layers, tokens, neurons]`` of ``acts`` ``[layers, tokens, neurons]``."""
        return normalise(acts, self)

    def value(self, layer: int, neuron: int, acts: np.ndarray) -> np.ndarray:
        """One neuron's normalised values for its activations ``acts`` ``[tokens]``."""
        a = np.asarray(acts, np.float64)
        return np.where(a >= 0, a / float(self.pos[layer, neuron]), a / float(self.neg[layer, neuron]))


def normalise(acts: torch.Tensor, view: "ActivationView | tuple | None") -> torch.Tensor:
    """``n`` ``[layers, tokens, neurons]`` (module docstring); the raw values when ``view`` is None.

    ``view`` is an :class:`ActivationView` or its ``(s⁺, s⁻)`` divisors.
    """
    a = acts.float()
    if view is None:
        return a
    pos, neg = view.scales if isinstance(view, ActivationView) else view
    pos = torch.from_numpy(np.ascontiguousarray(pos, np.float32))[:, None, :]  # [layers, 1, neurons]
    neg = torch.from_numpy(np.ascontiguousarray(neg, np.float32))[:, None, :]
    return torch.where(a >= 0, a / pos, a / neg)


def normalise_layer(acts: torch.Tensor, view: "ActivationView | tuple | None", layer: int) -> torch.Tensor:
    """``n`` ``[tokens, neurons]`` of one layer's ``acts`` ``[tokens, neurons]`` (:func:`normalise`)."""
    if view is None:
        return acts.float()
    pos, neg = view.scales if isinstance(view, ActivationView) else view
    return normalise(acts[None], (pos[layer:layer + 1], neg[layer:layer + 1]))[0]


def token_mask(n_tokens: int, skip_tokens: Sequence[int] = (SINK,)) -> torch.Tensor:
    """[tokens] bool: True for the tokens a ranking may use (``skip_tokens`` left out, unless
    that would leave nothing)."""
    keep = torch.ones(n_tokens, dtype=torch.bool)
    skip = [t for t in skip_tokens if 0 <= t < n_tokens]
    if skip and len(skip) < n_tokens:
        keep[skip] = False
    return keep


def neuron_extremes(norm: torch.Tensor, skip_sink: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, the token where ``|n|`` is largest and ``n`` there: (token ``[layers, neurons]`` int,
    value ``[layers, neurons]`` float)."""
    keep = token_mask(norm.shape[1], (SINK,) if skip_sink else ())
    mag = norm.abs().masked_fill(~keep[None, :, None], -1.0)
    tok = mag.argmax(dim=1)  # [layers, neurons]
    val = norm.gather(1, tok[:, None, :])[:, 0, :]
    return tok.numpy(), val.numpy()


@dataclass
class Salient:
    """Neurons at or beyond a threshold, strongest first (arrays of equal length)."""

    layer: np.ndarray  # [m] int
    neuron: np.ndarray  # [m] int
    token: np.ndarray  # [m] int: the neuron's most extreme token
    value: np.ndarray  # [m] float: the normalised value there (its sign is the polarity)
    total: int  # how many neurons passed before ``limit``

    @property
    def polarity(self) -> np.ndarray:
        return np.where(self.value >= 0, 1, -1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.layer)


def salient_neurons(norm: torch.Tensor, threshold: float = 1.0, skip_sink: bool = True,
                    limit: int | None = None) -> Salient:
    """The neurons whose ``|n|`` reaches ``threshold`` on some token, one per neuron at its
    most extreme token, strongest first (ties: layer, then neuron), at most ``limit``."""
    return salient_from_extremes(*neuron_extremes(norm, skip_sink), threshold, limit)


def salient_from_extremes(tok: np.ndarray, val: np.ndarray, threshold: float = 1.0,
                          limit: int | None = None) -> Salient:
    """:func:`salient_neurons` from the per-neuron extremes (token, value) ``[layers, neurons]``."""
    layer, neuron = np.nonzero(np.abs(val) >= threshold)
    order = np.argsort(-np.abs(val[layer, neuron]), kind="stable")
    total = len(order)
    if limit is not None:
        order = order[: int(limit)]
    layer, neuron = layer[order], neuron[order]
    return Salient(layer.astype(np.int64), neuron.astype(np.int64), tok[layer, neuron].astype(np.int64),
                   val[layer, neuron].astype(np.float64), total)


def top_cells(values: torch.Tensor, k: int, skip_tokens: Sequence[int] = (),
              view: "ActivationView | tuple | None" = None) -> list[dict]:
    """The ``k`` (layer, token, neuron) cells of ``values`` ``[layers, tokens, neurons]`` with the
    largest ``|value|``, as dicts; ``view`` normalises first (the reported value is then ``n``)."""
    v = normalise(values, view)
    keep = token_mask(v.shape[1], skip_tokens)
    flat = v.masked_fill(~keep[None, :, None], 0.0).reshape(-1)
    k = min(int(k), flat.numel())
    idx = torch.topk(flat.abs(), k).indices
    n_tok, n_neu = v.shape[1], v.shape[2]
    out = []
    for i in idx.tolist():
        layer, rest = divmod(i, n_tok * n_neu)
        tok, neuron = divmod(rest, n_neu)
        out.append({"layer": layer, "neuron": neuron, "token_index": tok, "value": float(flat[i])})
    return out


def merge_top(values: torch.Tensor, layer: torch.Tensor, token: torch.Tensor, neuron: torch.Tensor,
              k: int) -> list[dict]:
    """The ``k`` candidates with the largest ``|value|`` as :func:`top_cells`' dicts (candidates from
    several layers' own top cells: the global top ``k`` is among them)."""
    k = min(int(k), values.numel())
    idx = torch.topk(values.abs(), k).indices.tolist()
    return [{"layer": int(layer[i]), "neuron": int(neuron[i]), "token_index": int(token[i]),
             "value": float(values[i])} for i in idx]


def side_maxima(acts: torch.Tensor, first: int = 1) -> tuple[torch.Tensor, ...]:
    """Per neuron of one layer's raw ``acts`` ``[tokens, neurons]``, over tokens ``first…``: the largest
    value ``≥ 0`` and its (first) token, the smallest value ``< 0`` and its (first) token; a side
    with no such token has token −1 (value 0). Dividing by a positive divisor keeps the order, so
    these give :func:`neuron_extremes` under any view (:func:`extremes_from_sides`)."""
    a = acts[first:].float()
    if a.shape[0] == 0:
        z = torch.zeros(acts.shape[1])
        return z, torch.full_like(z, -1, dtype=torch.int32), z.clone(), torch.full_like(z, -1, dtype=torch.int32)
    pos = torch.where(a >= 0, a, torch.tensor(-1.0))
    pv, pt = pos.max(dim=0)  # torch returns the first index of a tie
    neg = torch.where(a < 0, a, torch.tensor(1.0))
    nv, nt = neg.min(dim=0)
    pt = torch.where(pv >= 0, pt + first, -1).to(torch.int32)
    nt = torch.where(nv < 0, nt + first, -1).to(torch.int32)
    return pv.clamp(min=0), pt, nv.clamp(max=0), nt


def _divide(a: torch.Tensor, view, scale_index: int) -> torch.Tensor:
    if view is None:
        return a
    scales = view.scales if isinstance(view, ActivationView) else view
    return a / torch.from_numpy(np.ascontiguousarray(scales[scale_index], np.float32))


def extremes_from_sides(pos_val: torch.Tensor, pos_tok: torch.Tensor, neg_val: torch.Tensor, neg_tok: torch.Tensor,
                        sink: torch.Tensor, n_tokens: int, view=None,
                        skip_sink: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`neuron_extremes` of the normalised activations, from :func:`side_maxima` of every layer
    (``[layers, neurons]`` each, over tokens 1…) and the sink's raw values ``sink`` ``[layers, neurons]``."""
    skip = skip_sink and n_tokens > 1  # token_mask keeps the sink when it is the only token
    n_pos = torch.where(pos_tok >= 0, _divide(pos_val, view, 0), torch.tensor(-1.0))  # |n| on the positive side
    n_neg = torch.where(neg_tok >= 0, _divide(neg_val, view, 1), torch.tensor(1.0))  # n (< 0) on the negative side
    take_pos = (n_pos > -n_neg) | ((n_pos == -n_neg) & ((pos_tok < neg_tok) | (neg_tok < 0)))
    mag = torch.where(take_pos, n_pos, -n_neg)
    val = torch.where(take_pos, n_pos, n_neg)
    tok = torch.where(take_pos, pos_tok, neg_tok).long()
    if not skip:
        s = sink.float()
        n0 = torch.where(s >= 0, _divide(s, view, 0), _divide(s, view, 1))
        first = n0.abs() >= mag
        tok, val, mag = torch.where(first, 0, tok), torch.where(first, n0, val), torch.where(first, n0.abs(), mag)
    # every |n| is 0 (or the neuron has no kept token): argmax is the first kept token, n there is 0
    zero = mag <= 0
    tok = torch.where(zero, 1 if skip else 0, tok)
    val = torch.where(zero, torch.tensor(0.0), val)
    return tok.numpy(), val.numpy()
