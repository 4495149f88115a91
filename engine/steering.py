"""Interventions on neuron activations: which neurons, how, and on which tokens.

An :class:`Intervention` names neurons as (layer, neuron, polarity) triples, a mode and
a token range:

* ``replace``: ``a ← strength × Q_polarity[layer, neuron]``, where ``Q_+1`` is the
  neuron's high extreme quantile and ``Q_-1`` its low one (Transluce uses 1−1e-7 and
  1e-7). Strength 0 suppresses; Transluce's strengthen default is 0.75. The quantile
  tables are passed in (they come from the neuron database).
* ``scale``: ``a ← factor × a``; factor 0 ablates, factor 1 changes nothing.

Token ranges (:class:`TokenRange`) are explicit prompt positions, the last user turn, or
the whole prompt, optionally "also every generated token"; their text form
(``last_user``, ``prompt``, ``positions:3-7,9``, each optionally ``+generated``) is read by
:func:`parse_token_range` and written by :func:`token_range_text`. :func:`compile_interventions` checks ranges,
ids and contradictions once, and turns the list into per-layer index tensors that
:mod:`engine.hooks` applies inside ``mlp.down_proj``'s forward pre-hook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .chat import RenderedChat
from .errors import MonitorError

INTERVENTION_MODES = ("replace", "scale")
RANGE_KINDS = ("last_user", "prompt", "positions")
GENERATED = -1  # key for "every generated token" in a neuron's position map


@dataclass(frozen=True)
class TokenRange:
    """Which tokens an intervention touches.

    ``kind``: ``last_user`` (the default, as in the reference), ``prompt`` (every prompt
    token) or ``positions`` (explicit ``positions``). ``generated=True`` adds every
    generated token.
    """

    kind: str = "last_user"
    positions: tuple[int, ...] = ()
    generated: bool = False

    def resolve(self, rendered: RenderedChat) -> list[int]:
        """Prompt positions covered, sorted; raises if a position is out of range."""
        n = len(rendered)
        if self.kind == "prompt":
            return list(range(n))
        if self.kind == "last_user":
            start, end = rendered.last_turn("user") if rendered.messages else (0, n)
            return list(range(start, end))
        if self.kind == "positions":
            out = set()
            for p in self.positions:
                q = int(p) + n if int(p) < 0 else int(p)
                if not 0 <= q < n:
                    raise MonitorError(f"Token position {p} is out of range: the prompt has tokens 0..{n - 1}.")
                out.add(q)
            return sorted(out)
        raise MonitorError(f"Unknown token range {self.kind!r}; use one of {', '.join(RANGE_KINDS)}.")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "positions": list(self.positions), "generated": self.generated}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TokenRange":
        return cls(str(d.get("kind", "last_user")), tuple(int(p) for p in d.get("positions", ())), bool(d.get("generated", False)))


def token_range_text(tr: TokenRange) -> str:
    """The short text form of a token range: ``last_user``, ``prompt``, ``positions:3-7,9``,
    each optionally ``+generated``. Inverse of :func:`parse_token_range`."""
    if tr.kind == "positions":
        base = "positions:" + _positions_text(tr.positions)
    else:
        base = tr.kind
    return base + ("+generated" if tr.generated else "")


def _positions_text(positions: Sequence[int]) -> str:
    ps = sorted(int(p) for p in positions)
    out, i = [], 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ",".join(out)


def parse_token_range(text: str | Mapping | TokenRange | None) -> TokenRange:
    """A :class:`TokenRange` from its text form, its dict form, or itself (validated).

    Text: ``last_user`` (default), ``prompt``, or ``positions:A-B,C`` (inclusive spans of
    prompt token indices), each optionally ``+generated``. Two bases at once
    (``prompt+last_user``), overlapping or reversed spans, and explicit positions on a
    ``last_user``/``prompt`` range are contradictory and raise.
    """
    if text is None:
        return TokenRange()
    if isinstance(text, TokenRange):
        return _check_range(text)
    if isinstance(text, Mapping):
        unknown = set(text) - {"kind", "positions", "generated"}
        if unknown:
            raise MonitorError(f"Unknown token-range field(s) {', '.join(sorted(unknown))}: use kind, positions, generated.")
        try:
            positions = tuple(int(p) for p in text.get("positions", ()) or ())
        except (TypeError, ValueError) as err:
            raise MonitorError("Token-range positions must be whole numbers.") from err
        return _check_range(TokenRange(str(text.get("kind", "last_user")), positions, bool(text.get("generated", False))))
    if not isinstance(text, str):
        raise MonitorError(f"A token range must be text like 'last_user' or 'prompt+generated', not {type(text).__name__}.")
    parts = [p.strip() for p in text.strip().split("+") if p.strip()]
    generated = "generated" in parts
    if parts.count("generated") > 1:
        raise MonitorError(f"Token range {text!r} names 'generated' twice; write it once.")
    bases = [p for p in parts if p != "generated"]
    if len(bases) > 1:
        raise MonitorError(f"Token range {text!r} is contradictory: pick one of last_user, prompt or positions:A-B "
                           "(optionally +generated).")
    base = bases[0] if bases else "last_user"
    if base in ("last_user", "prompt"):
        return TokenRange(base, (), generated)
    if base.startswith("positions:"):
        spans = []
        for chunk in base[len("positions:"):].split(","):
            chunk = chunk.strip()
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", chunk)
            if not m:
                raise MonitorError(f"Bad token span {chunk!r} in {text!r}: write positions like 3-7,9 "
                                   "(non-negative token indices, inclusive).")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise MonitorError(f"Token span {chunk!r} is reversed: write the smaller index first ({b}-{a}).")
            spans.append((a, b))
        spans.sort()
        for (a1, b1), (a2, b2) in zip(spans, spans[1:]):
            if a2 <= b1:
                raise MonitorError(f"Token spans {a1}-{b1} and {a2}-{b2} in {text!r} overlap: merge them into one span.")
        positions = tuple(p for a, b in spans for p in range(a, b + 1))
        return _check_range(TokenRange("positions", positions, generated))
    raise MonitorError(f"Unknown token range {base!r}: use last_user, prompt or positions:A-B, optionally +generated.")


def _check_range(tr: TokenRange) -> TokenRange:
    if tr.kind not in RANGE_KINDS:
        raise MonitorError(f"Unknown token range {tr.kind!r}: use last_user, prompt or positions.")
    if tr.kind != "positions" and tr.positions:
        raise MonitorError(f"Token range {tr.kind!r} with explicit positions is contradictory: use kind 'positions' "
                           "for explicit tokens, or drop the positions.")
    if tr.kind == "positions":
        if not tr.positions:
            raise MonitorError("A 'positions' token range needs at least one token index.")
        if len(set(tr.positions)) != len(tr.positions):
            raise MonitorError("The token range lists a position twice (overlapping spans): list each token once.")
        if any(int(p) < 0 for p in tr.positions):
            raise MonitorError("Token positions in a steering spec must be 0 or more.")
        return TokenRange("positions", tuple(sorted(int(p) for p in tr.positions)), bool(tr.generated))
    return TokenRange(tr.kind, (), bool(tr.generated))


def ranges_may_overlap(a: TokenRange, b: TokenRange) -> bool:
    """Whether two ranges can share a token on some chat (only disjoint explicit positions cannot)."""
    if a.generated and b.generated:
        return True
    if a.kind == "positions" and b.kind == "positions":
        return bool(set(a.positions) & set(b.positions))
    return True


@dataclass
class Intervention:
    neurons: list[tuple[int, int, int]]  # (layer, neuron, polarity ±1)
    mode: str = "replace"
    strength: float = 0.0  # replace: a ← strength × quantile(polarity)
    factor: float = 0.0  # scale: a ← factor × a
    tokens: TokenRange = field(default_factory=TokenRange)
    label: str = ""

    def effect(self) -> tuple[str, float]:
        return (self.mode, float(self.strength if self.mode == "replace" else self.factor))


def needs_quantiles(interventions: Sequence[Intervention]) -> bool:
    """Whether any intervention replaces with a non-zero strength (``a ← strength × Q``), the
    only kind that needs the quantile tables."""
    return any(iv.mode == "replace" and iv.strength != 0 and iv.neurons for iv in interventions)


def check_quantiles(interventions: Sequence[Intervention], quantiles: Mapping[int, np.ndarray] | None) -> None:
    """Raise unless every non-zero ``replace`` has a finite quantile for its neuron and polarity."""
    for iv in interventions:
        if not needs_quantiles([iv]):
            continue
        if quantiles is None:
            raise MonitorError("Strengthening needs the neurons' activation quantiles: open a neuron database.")
        for l, n, p in iv.neurons:
            table = quantiles[int(p)]
            if not (l < table.shape[0] and n < table.shape[1]) or not np.isfinite(table[l][n]):
                raise MonitorError(f"Neuron {l}/{n} has no stored activation quantile, so it cannot be strengthened: "
                                   "rebuild the database or suppress instead.")


@dataclass
class LayerOps:
    """Everything one layer's hook applies: ``[k]`` neuron ids and their targets."""

    neurons: torch.Tensor  # [k] long
    values: torch.Tensor  # [k] float: replacement value, or factor
    replace: torch.Tensor  # [k] bool: True = replace, False = scale
    positions: torch.Tensor  # [k, prompt_len] bool: which prompt positions each op touches
    generated: torch.Tensor  # [k] bool: also touch positions ≥ prompt_len


@dataclass
class CompiledInterventions:
    prompt_len: int
    layers: dict[int, list[LayerOps]]  # per layer, rounds with distinct neurons
    n_neurons: int

    def __bool__(self) -> bool:
        return bool(self.layers)

    def touches(self, layer: int) -> bool:
        return bool(self.layers.get(layer))

    def apply(self, layer: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        """``x`` [batch, tokens, neurons] with this layer's ops applied (every row alike)."""
        for ops in self.layers.get(layer, ()):
            x = apply_layer_ops(x, ops, offset, self.prompt_len)
        return x


@dataclass
class _DenseLayer:
    """One layer's ops of every set of a :class:`StackedInterventions` as dense tables:
    a touched cell becomes ``a·mult + add`` (replace: ``mult = 0, add = value``; scale:
    ``mult = factor, add = 0``; untouched neurons ``1, 0``)."""

    mult: torch.Tensor  # [sets, neurons]
    add: torch.Tensor  # [sets, neurons]
    positions: torch.Tensor  # [sets, prompt_len] bool
    generated: torch.Tensor  # [sets] bool


@dataclass
class StackedInterventions:
    """A different :class:`CompiledInterventions` per block of batch rows, for scoring many
    steering conditions in one forward pass.

    A batch of ``S·r`` rows is read as ``S`` consecutive blocks of ``r`` rows; block ``i``
    gets ``sets[i]``. Every set must be compiled on a chat of the same length. Where each
    set's ops on a layer share one token range (the usual case: one range per condition),
    the layer is applied as dense per-set tables in a few tensor operations; otherwise each
    block runs :func:`apply_layer_ops` on its own rows. Both give exactly what the sets give
    one at a time.
    """

    sets: list[CompiledInterventions]
    prompt_len: int = field(init=False)
    _dense: dict[int, _DenseLayer | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError("StackedInterventions needs at least one set")
        lengths = {c.prompt_len for c in self.sets}
        if len(lengths) != 1:
            raise ValueError("stacked interventions must be compiled on chats of one length")
        self.prompt_len = lengths.pop()
        for layer in {l for c in self.sets for l in c.layers}:
            self._dense[layer] = self._densify(layer)

    def __bool__(self) -> bool:
        return any(self.sets)

    def touches(self, layer: int) -> bool:
        return layer in self._dense

    def _densify(self, layer: int) -> _DenseLayer | None:
        ref = next(c for c in self.sets if c.layers.get(layer)).layers[layer][0]
        S, n = len(self.sets), self.sets[0].n_neurons
        dev, dtype = ref.values.device, ref.values.dtype
        mult = torch.ones(S, n, dtype=dtype, device=dev)
        add = torch.zeros(S, n, dtype=dtype, device=dev)
        positions = torch.zeros(S, self.prompt_len, dtype=torch.bool, device=dev)
        generated = torch.zeros(S, dtype=torch.bool, device=dev)
        for i, c in enumerate(self.sets):
            rounds = c.layers.get(layer)
            if not rounds:
                continue
            if len(rounds) > 1:
                return None
            ops = rounds[0]
            if not (ops.positions == ops.positions[:1]).all() or not (ops.generated == ops.generated[:1]).all():
                return None  # ops with different token ranges: applied block by block
            mult[i, ops.neurons] = torch.where(ops.replace, torch.zeros_like(ops.values), ops.values)
            add[i, ops.neurons] = torch.where(ops.replace, ops.values, torch.zeros_like(ops.values))
            positions[i] = ops.positions[0]
            generated[i] = ops.generated[0]
        return _DenseLayer(mult, add, positions, generated)

    def apply(self, layer: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        S = len(self.sets)
        if x.shape[0] % S:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split into {S} equal blocks")
        r = x.shape[0] // S
        dense = self._dense.get(layer)
        if dense is None:
            if layer not in self._dense:
                return x
            return torch.cat([c.apply(layer, x[i * r:(i + 1) * r], offset) for i, c in enumerate(self.sets)])
        t = x.shape[1]
        pos = torch.arange(offset, offset + t, device=x.device)
        in_prompt = pos < self.prompt_len
        touch = torch.zeros(S, t, dtype=torch.bool, device=x.device)
        if in_prompt.any():
            touch[:, in_prompt] = dense.positions[:, pos[in_prompt]]
        touch |= (~in_prompt)[None, :] & dense.generated[:, None]
        if not touch.any():
            return x
        xv = x.view(S, r, t, x.shape[-1])
        new = xv * dense.mult[:, None, None, :].to(x.dtype) + dense.add[:, None, None, :].to(x.dtype)
        return torch.where(touch[:, None, :, None], new, xv).view_as(x)


def compile_interventions(
    interventions: Iterable[Intervention],
    rendered: RenderedChat,
    n_layers: int,
    n_neurons: int,
    quantiles: Mapping[int, np.ndarray | torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CompiledInterventions:
    """Validate interventions and group them per layer.

    ``quantiles`` maps polarity (+1, −1) to a ``[layers, neurons]`` table; it is needed
    only by ``replace`` with a non-zero strength. A (layer, neuron) that two entries
    touch on a shared token with different effects is contradictory and raises; exact
    duplicates are merged, so a ``scale`` never applies twice to the same cell.
    """
    prompt_len = len(rendered)
    # (layer, neuron) -> {prompt position or GENERATED: (mode, value)}
    cells: dict[tuple[int, int], dict[int, tuple[str, float]]] = {}
    for iv in interventions:
        if iv.mode not in INTERVENTION_MODES:
            raise MonitorError(f"Unknown steering mode {iv.mode!r}; use replace or scale.")
        if not iv.neurons:
            continue
        positions = iv.tokens.resolve(rendered) + ([GENERATED] if iv.tokens.generated else [])
        for layer, neuron, polarity in iv.neurons:
            layer, neuron, polarity = int(layer), int(neuron), int(polarity)
            if not 0 <= layer < n_layers:
                raise MonitorError(f"Layer {layer} is out of range: the model has layers 0..{n_layers - 1}.")
            if not 0 <= neuron < n_neurons:
                raise MonitorError(f"Neuron {neuron} is out of range: each layer has neurons 0..{n_neurons - 1}.")
            if polarity not in (1, -1):
                raise MonitorError(f"Polarity {polarity} is invalid; use +1 or -1.")
            if iv.mode == "scale":
                value = float(iv.factor)
            elif iv.strength == 0:
                value = 0.0
            elif quantiles is None:
                raise MonitorError("Replace-mode steering needs the neuron quantiles: build the database first.")
            else:
                value = float(iv.strength) * float(quantiles[polarity][layer][neuron])
            effect = (iv.mode, value)
            cell = cells.setdefault((layer, neuron), {})
            for p in positions:
                old = cell.setdefault(p, effect)
                if old != effect:
                    where = "generated tokens" if p == GENERATED else f"token {p}"
                    raise MonitorError(
                        f"Contradictory interventions on layer {layer} neuron {neuron}: {old[0]} {old[1]:g} and "
                        f"{iv.mode} {value:g} both cover {where}; remove one or make their token ranges disjoint."
                    )
    per_layer: dict[int, list] = {}
    for (layer, neuron), cell in sorted(cells.items()):
        by_effect: dict[tuple[str, float], list[int]] = {}
        for p, effect in cell.items():
            by_effect.setdefault(effect, []).append(p)
        for (mode, value), ps in by_effect.items():
            per_layer.setdefault(layer, []).append(
                (neuron, value, mode == "replace", [p for p in ps if p != GENERATED], GENERATED in ps)
            )
    layers: dict[int, list[LayerOps]] = {}
    for layer, ops in per_layer.items():
        # A neuron with different effects on disjoint tokens gets one op per effect; split
        # them into rounds so that no round indexes the same neuron twice.
        rounds: list[list] = []
        seen: dict[int, int] = {}
        for op in ops:
            r = seen.get(op[0], 0)
            seen[op[0]] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(op)
        layers[layer] = [_layer_ops(rnd, prompt_len, device, dtype) for rnd in rounds]
    return CompiledInterventions(prompt_len, layers, n_neurons)


def _layer_ops(ops: list, prompt_len: int, device, dtype) -> LayerOps:
    mask = torch.zeros(len(ops), prompt_len, dtype=torch.bool)
    for i, (_, _, _, pos, _) in enumerate(ops):
        if pos:
            mask[i, pos] = True
    return LayerOps(
        neurons=torch.tensor([o[0] for o in ops], dtype=torch.long, device=device),
        values=torch.tensor([o[1] for o in ops], dtype=dtype, device=device),
        replace=torch.tensor([o[2] for o in ops], dtype=torch.bool, device=device),
        positions=mask.to(device),
        generated=torch.tensor([o[4] for o in ops], dtype=torch.bool, device=device),
    )


def apply_layer_ops(x: torch.Tensor, ops: LayerOps, offset: int, prompt_len: int) -> torch.Tensor:
    """Return a copy of ``x`` [batch, tokens, neurons] with ``ops`` applied.

    Token ``j`` of this call sits at absolute position ``offset + j``. A cell is touched
    when its position is in the op's prompt positions, or is ≥ ``prompt_len`` and the
    op covers generated tokens. Replace: ``a ← value``; scale: ``a ← value × a``.
    """
    t = x.shape[1]
    pos = torch.arange(offset, offset + t, device=x.device)
    in_prompt = pos < prompt_len
    touch = torch.zeros(ops.neurons.shape[0], t, dtype=torch.bool, device=x.device)  # [k, t]
    if in_prompt.any():
        touch[:, in_prompt] = ops.positions[:, pos[in_prompt]]
    touch |= (~in_prompt)[None, :] & ops.generated[:, None]
    if not touch.any():
        return x
    y = x.clone()
    cols = y[:, :, ops.neurons]  # [batch, t, k]
    vals = ops.values.to(y.dtype)
    new = torch.where(ops.replace, vals.expand_as(cols), cols * vals)
    y[:, :, ops.neurons] = torch.where(touch.T[None], new, cols)
    return y
