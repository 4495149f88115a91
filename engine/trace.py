"""One trace of a chat: tokens, next-token probabilities, neuron activations, attribution.

Attribution of neuron ``n`` in layer ``l`` at token ``t`` toward target position ``τ``:

* ``"logprob"`` (default): ``A = a[l,t,n] · ∂ log p(x_τ | x_<τ) / ∂ a[l,t,n]``
* ``"prob"`` (Transluce's choice): ``A = a[l,t,n] · ∂ p(x_τ | x_<τ) / ∂ a[l,t,n]``
  ``= p(x_τ) × the logprob variant`` (chain rule), so one backward pass serves both.
* any other objective of :mod:`engine.attribution` (a distractor gives the contrastive
  ``log p(x_τ) − log p(d)``; an answer objective ``L(c) − L(c')``): ``A = a · ∂f/∂a``.

The probability is read at the logits of position ``τ − 1``. The gradient is the total
derivative: the captured activations stay in the graph and ``torch.autograd.grad``
differentiates with respect to them, from one forward and one backward pass; the
weights are frozen and the input embeddings require grad so the graph is built.

**Storage.** A trace whose ``[layers, tokens, neurons]`` float32 tensor fits in
``MONITOR_TRACE_DENSE_MB`` (default :data:`DENSE_MB`; the embedded model up to a few hundred
tokens) keeps ``activations`` and ``attributions`` whole, as before. A bigger one (Llama-3.1-8B:
32 × 14,336 neurons, 367 MB per tensor at 200 tokens) keeps a :class:`CompactStore` instead
and ``activations`` / ``attributions`` are None:

* per layer, the :data:`TOP_PER_LAYER` non-sink cells with the largest ``|value|`` (activations,
  attributions, and the activation at each of those attribution cells), exact;
* per (layer, neuron) the largest value ≥ 0 and the smallest < 0 over tokens 1… with their tokens
  (:func:`engine.activation_view.side_maxima`: the chat table's rows under any view and threshold);
* token 0's row (the attention sink) and Σ|attribution| per (layer, token) (the heatmap);
* anything else (a neuron's row over tokens, a heatmap at a new threshold, a ranking under a view)
  is recomputed exactly: a forward pass with the same interventions (with attribution, the same
  forward and backward) that hands each layer to a reduction and drops it, so no whole tensor is
  ever held; single layers fetched that way stay in a small LRU (:data:`LAYER_CACHE_BYTES`).

Consumers use the methods that work for both storages: :meth:`Trace.layer`,
:meth:`Trace.neuron_row`, :meth:`Trace.neuron_rows`, :meth:`Trace.map_layers`, :meth:`Trace.cells`,
:meth:`Trace.top_cells`, :meth:`Trace.extremes`, :meth:`Trace.salient`, :meth:`Trace.sides`,
:meth:`Trace.abs_sums`; :meth:`Trace.nbytes` is what the trace holds.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .activation_view import (Salient, extremes_from_sides, merge_top, neuron_extremes, normalise, normalise_layer,
                              salient_from_extremes, side_maxima, token_mask, top_cells)
from .attribution import Objective, token_objective
from .chat import Chat, RenderedChat, render_chat
from .errors import MonitorError
from .hooks import NeuronHooks
from .steering import Intervention, compile_interventions

ATTRIBUTION_KINDS = ("logprob", "prob")
KINDS = ("activations", "attributions")
DENSE_MB = 64.0  # a [layers, tokens, neurons] float32 tensor up to this size is kept whole
TOP_PER_LAYER = 1024  # cells per layer a compact trace keeps exactly (≥ the dashboard's and linter's top k)
LAYER_CACHE_BYTES = 16 * 2**20  # recomputed layers a compact trace keeps (Llama-3.1-8B at 200 tokens: one)


def dense_budget_bytes() -> float:
    """``MONITOR_TRACE_DENSE_MB`` (MB of one ``[layers, tokens, neurons]`` float32 tensor) in bytes."""
    raw = os.environ.get("MONITOR_TRACE_DENSE_MB", "").strip()
    try:
        mb = float(raw) if raw else DENSE_MB
    except ValueError:
        raise MonitorError(f"MONITOR_TRACE_DENSE_MB must be a number of megabytes; got {raw!r}.") from None
    return mb * 2**20


def _bytes(*tensors) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class CompactStore:
    """What a trace too big to keep whole holds (module docstring); ``[layers, …]`` CPU tensors."""

    n_tokens: int
    n_neurons: int
    act_top_idx: torch.Tensor  # [layers, K] int32: token × neurons + neuron, tokens 1…
    act_top_val: torch.Tensor  # [layers, K] float32
    pos_val: torch.Tensor  # [layers, neurons] float32: largest activation ≥ 0 over tokens 1…
    pos_tok: torch.Tensor  # [layers, neurons] int32 (−1: none)
    neg_val: torch.Tensor  # [layers, neurons] float32: smallest activation < 0
    neg_tok: torch.Tensor  # [layers, neurons] int32 (−1: none)
    act_sink: torch.Tensor  # [layers, neurons] float32: token 0
    attr_top_idx: torch.Tensor | None = None  # [layers, K] int32
    attr_top_val: torch.Tensor | None = None  # [layers, K] float32
    attr_top_act: torch.Tensor | None = None  # [layers, K] float32: the activation at those cells
    attr_sink: torch.Tensor | None = None  # [layers, neurons]
    attr_abs_sum: torch.Tensor | None = None  # [layers, tokens]: Σ_neurons |attribution|

    def nbytes(self) -> int:
        return _bytes(*(getattr(self, f) for f in self.__dataclass_fields__))


class _Builder:
    """Fills a :class:`CompactStore` one layer at a time (each layer dropped once summarised)."""

    def __init__(self, n_layers: int, n_tokens: int, n_neurons: int, attribution: bool):
        self.L, self.T, self.N = n_layers, n_tokens, n_neurons
        self.k = min(TOP_PER_LAYER, max(n_tokens - 1, 0) * n_neurons)
        self.parts: dict[str, list] = {}
        self.attribution = attribution

    def _top(self, x: torch.Tensor):
        flat = x[1:].reshape(-1)
        idx = torch.topk(flat.abs(), self.k).indices
        return (idx + self.N).to(torch.int32), flat[idx]

    def add(self, layer: int, acts: torch.Tensor, attr: torch.Tensor | None = None) -> None:
        a = acts.detach().float().cpu()  # [tokens, neurons]
        put = lambda name, v: self.parts.setdefault(name, [None] * self.L).__setitem__(layer, v)  # noqa: E731
        for name, v in zip(("act_top_idx", "act_top_val"), self._top(a)):
            put(name, v)
        for name, v in zip(("pos_val", "pos_tok", "neg_val", "neg_tok"), side_maxima(a)):
            put(name, v)
        put("act_sink", a[0].clone())
        if attr is not None:
            r = attr.detach().float().cpu()
            idx, val = self._top(r)
            put("attr_top_idx", idx)
            put("attr_top_val", val)
            put("attr_top_act", a.reshape(-1)[idx.long()].clone())
            put("attr_sink", r[0].clone())
            put("attr_abs_sum", r.abs().sum(-1))

    def store(self) -> CompactStore:
        return CompactStore(self.T, self.N, **{k: torch.stack(v) for k, v in self.parts.items()})


@dataclass
class _Source:
    """What recomputing a compact trace's layers needs: the same input, interventions and objective."""

    lm: object
    ids: torch.Tensor  # [tokens] on the model's device
    compiled: object
    objective: Objective | None
    scale: float | None  # attribution = a · ∂f/∂a × scale (the target probability for "prob")


class _Stop(Exception):
    pass


@dataclass
class Trace:
    rendered: RenderedChat
    activations: torch.Tensor | None  # [layers, tokens, neurons] float32, CPU; None when compact
    top_next: list[list[tuple[str, float]]]  # per position, the top-k next tokens and probabilities
    next_token_prob: list[float | None]  # per position t, p(x_t | x_<t); None at t = 0
    attributions: torch.Tensor | None = None  # [layers, tokens, neurons] float32, CPU; None when compact
    attribution_kind: str | None = None
    target_index: int | None = None
    target_prob: float | None = None
    interventions: list[Intervention] = field(default_factory=list)
    objective: Objective | None = None  # what the attribution differentiates (engine.attribution)
    objective_value: float | None = None  # its value f on this trace
    compact: CompactStore | None = None  # set instead of the two tensors for a big trace
    _source: _Source | None = field(default=None, repr=False)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)  # (kind, layer) → [tokens, neurons]

    # ------------------------------------------------------------------ shape and storage
    @property
    def tokens(self) -> list[str]:
        return self.rendered.tokens

    @property
    def is_compact(self) -> bool:
        return self.compact is not None

    @property
    def has_attribution(self) -> bool:
        return self.attributions is not None or (self.compact is not None and self.compact.attr_top_idx is not None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, tokens, neurons)."""
        if self.compact is not None:
            return self.compact.act_sink.shape[0], self.compact.n_tokens, self.compact.n_neurons
        return tuple(self.activations.shape)

    def nbytes(self) -> int:
        """Bytes of every tensor this trace holds (dense tensors, or the compact store and its cached layers)."""
        return (_bytes(self.activations, self.attributions) + (self.compact.nbytes() if self.compact else 0)
                + _bytes(*self._cache.values()))

    def _check(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind is one of {KINDS}; got {kind!r}")
        if kind == "attributions" and not self.has_attribution:
            raise MonitorError("This trace has no attribution: pass a target index.")

    def _dense(self, kind: str) -> torch.Tensor | None:
        return self.activations if kind == "activations" else self.attributions

    # ------------------------------------------------------------------ layers
    def map_layers(self, kind: str, fn: Callable[[int, torch.Tensor], object],
                   layers: Iterable[int] | None = None) -> dict[int, object]:
        """``{layer: fn(layer, values [tokens, neurons])}`` for ``layers`` (all by default). A compact
        trace recomputes the layers it has not cached in one pass, one layer alive at a time."""
        self._check(kind)
        layers = range(self.shape[0]) if layers is None else sorted({int(l) for l in layers})
        if self.compact is None:
            dense = self._dense(kind)
            return {l: fn(l, dense[l]) for l in layers}
        out, missing = {}, []
        for l in layers:
            if (kind, l) in self._cache:
                self._cache.move_to_end((kind, l))
                out[l] = fn(l, self._cache[(kind, l)])
            else:
                missing.append(l)
        if missing:
            self._recompute(kind, missing, lambda l, x: out.__setitem__(l, fn(l, x)))
        return {l: out[l] for l in layers}

    def layer(self, kind: str, layer: int) -> torch.Tensor:
        """``[tokens, neurons]`` float32 values of one layer (recomputed and cached when compact)."""
        self._check(kind)
        if self.compact is None:
            return self._dense(kind)[int(layer)]
        key = (kind, int(layer))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        got = self.map_layers(kind, lambda l, x: x, [layer])[int(layer)]
        if _bytes(got) <= LAYER_CACHE_BYTES:
            self._cache[key] = got
            while _bytes(*self._cache.values()) > LAYER_CACHE_BYTES:
                self._cache.popitem(last=False)
        return got

    def neuron_row(self, kind: str, layer: int, neuron: int) -> torch.Tensor:
        """``[tokens]``: one neuron's values over the tokens."""
        return self.layer(kind, layer)[:, int(neuron)]

    def neuron_rows(self, kind: str, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
        """``{(layer, neuron): [tokens]}`` for many neurons, one pass over their layers."""
        by_layer: dict[int, list[int]] = {}
        for l, n in pairs:
            by_layer.setdefault(int(l), []).append(int(n))
        got = self.map_layers(kind, lambda l, x: x[:, by_layer[l]].clone(), by_layer)
        return {(l, n): got[l][:, i] for l, ns in by_layer.items() for i, n in enumerate(ns)}

    # ------------------------------------------------------------------ cells and rankings
    def cells(self, kind: str, layer, token, neuron) -> np.ndarray:
        """float32 values at the cells ``(layer[i], token[i], neuron[i])`` (arrays of equal length)."""
        self._check(kind)
        l, t, n = (torch.as_tensor(np.asarray(x, np.int64)).reshape(-1) for x in (layer, token, neuron))
        if self.compact is None:
            return self._dense(kind)[l, t, n].numpy()
        c = self.compact
        out = torch.full(l.shape, float("nan"))
        found = torch.zeros(l.shape, dtype=torch.bool)
        if kind == "activations":
            sink = c.act_sink[l, n]
            hit = t == 0
            out, found = torch.where(hit, sink, out), found | hit
            for val, tok in ((c.pos_val, c.pos_tok), (c.neg_val, c.neg_tok)):
                hit = ~found & (tok[l, n].long() == t)
                out, found = torch.where(hit, val[l, n], out), found | hit
            tables = [(c.act_top_idx, c.act_top_val)] + ([(c.attr_top_idx, c.attr_top_act)]
                                                         if c.attr_top_idx is not None else [])
        else:
            hit = t == 0
            out, found = torch.where(hit, c.attr_sink[l, n], out), found | hit
            tables = [(c.attr_top_idx, c.attr_top_val)]
        flat = t * c.n_neurons + n
        for idx, val in tables:
            rows = idx[l].long()  # [m, K]
            match = rows == flat[:, None]
            hit = ~found & match.any(dim=1)
            pick = val[l].gather(1, match.float().argmax(dim=1, keepdim=True))[:, 0]
            out, found = torch.where(hit, pick, out), found | hit
        if not bool(found.all()):
            miss = torch.nonzero(~found).flatten()
            need: dict[int, list[int]] = {}
            for i in miss.tolist():
                need.setdefault(int(l[i]), []).append(i)
            got = self.map_layers(kind, lambda ll, x: x[t[need[ll]], n[need[ll]]].clone(), need)
            for ll, ii in need.items():
                out[ii] = got[ll]
        return out.numpy()

    def top_cells(self, kind: str, k: int, skip_tokens: Sequence[int] = (), view=None) -> list[dict]:
        """:func:`engine.activation_view.top_cells` of ``kind`` (``view`` normalises activations)."""
        self._check(kind)
        view = view if kind == "activations" else None
        if self.compact is None:
            return top_cells(self._dense(kind), k, skip_tokens, view)
        L, T, N = self.shape
        keep = token_mask(T, skip_tokens)
        c = self.compact
        idx, val = (c.act_top_idx, c.act_top_val) if kind == "activations" else (c.attr_top_idx, c.attr_top_val)
        if view is None and bool(keep[1:].all()) and int(k) <= idx.shape[1]:
            # the global top k of tokens 1… is among each layer's own top k
            layer = torch.arange(L)[:, None].expand_as(idx).reshape(-1)
            flat = idx.reshape(-1).long()
            tok, neuron, values = flat // N, flat % N, val.reshape(-1)
            if bool(keep[0]):
                sink = c.act_sink if kind == "activations" else c.attr_sink
                layer = torch.cat([layer, torch.arange(L).repeat_interleave(N)])
                tok = torch.cat([tok, torch.zeros(L * N, dtype=torch.long)])
                neuron = torch.cat([neuron, torch.arange(N).repeat(L)])
                values = torch.cat([values, sink.reshape(-1)])
            return merge_top(values, layer, tok, neuron, k)

        def layer_top(l: int, x: torch.Tensor):
            v = normalise_layer(x, view, l).masked_fill(~keep[:, None], 0.0).reshape(-1)
            i = torch.topk(v.abs(), min(int(k), v.numel())).indices
            return v[i], i

        got = self.map_layers(kind, layer_top)
        values = torch.cat([v for v, _ in got.values()])
        flat = torch.cat([i for _, i in got.values()])
        layer = torch.cat([torch.full((len(i),), l) for l, (_, i) in got.items()])
        return merge_top(values, layer, flat // N, flat % N, k)

    def top_activations(self, k: int = 20, skip_tokens: tuple[int, ...] = (0,), view=None) -> list[dict]:
        """The ``k`` (layer, neuron, token) cells with the largest |activation|
        (:func:`engine.activation_view.top_cells`; token 0, the attention sink, left out by
        default). ``view`` (an :class:`~engine.activation_view.ActivationView`) normalises first."""
        return self.top_cells("activations", k, skip_tokens, view)

    def top_attributions(self, k: int = 20) -> list[dict]:
        return self.top_cells("attributions", k, ())

    def extremes(self, view=None, skip_sink: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """:func:`engine.activation_view.neuron_extremes` of the (normalised) activations."""
        if self.compact is None:
            return neuron_extremes(normalise(self.activations, view), skip_sink)
        c = self.compact
        return extremes_from_sides(c.pos_val, c.pos_tok, c.neg_val, c.neg_tok, c.act_sink, c.n_tokens, view, skip_sink)

    def salient(self, view=None, threshold: float = 1.0, skip_sink: bool = True, limit: int | None = None) -> Salient:
        """:func:`engine.activation_view.salient_neurons` of the (normalised) activations."""
        return salient_from_extremes(*self.extremes(view, skip_sink), threshold, limit)

    def sides(self, view=None, skip_tokens: Sequence[int] = (0,)) -> torch.Tensor:
        """``[2, layers, neurons]``: per neuron the largest ``max(n, 0)`` and ``max(−n, 0)`` over the
        tokens left after ``skip_tokens`` (:func:`engine.activation_view.token_mask`)."""
        L, T, N = self.shape
        keep = token_mask(T, skip_tokens)
        if self.compact is not None and bool(keep[1:].all()):
            c = self.compact
            pv = normalise(c.pos_val[:, None, :], view)[:, 0] if view is not None else c.pos_val
            nv = normalise(c.neg_val[:, None, :], view)[:, 0] if view is not None else c.neg_val
            best_pos = torch.where(c.pos_tok >= 0, pv, torch.tensor(0.0)).clamp(min=0)
            best_neg = torch.where(c.neg_tok >= 0, -nv, torch.tensor(0.0)).clamp(min=0)
            if bool(keep[0]):
                n0 = normalise(c.act_sink[:, None, :], view)[:, 0]
                best_pos = torch.maximum(best_pos, n0.clamp(min=0))
                best_neg = torch.maximum(best_neg, (-n0).clamp(min=0))
            return torch.stack([best_pos, best_neg])

        def side(l: int, x: torch.Tensor) -> torch.Tensor:
            v = normalise_layer(x, view, l).masked_fill(~keep[:, None], 0.0)
            return torch.stack([v.clamp(min=0).max(dim=0).values, (-v).clamp(min=0).max(dim=0).values])

        got = self.map_layers("activations", side)
        return torch.stack([got[l] for l in range(L)], dim=1)

    def abs_sums(self, kind: str) -> torch.Tensor:
        """``[layers, tokens]``: Σ over neurons of ``|value|``."""
        self._check(kind)
        if self.compact is None:
            return self._dense(kind).abs().sum(-1)
        if kind == "attributions":
            return self.compact.attr_abs_sum.clone()
        got = self.map_layers(kind, lambda l, x: x.abs().sum(-1))
        return torch.stack([got[l] for l in range(self.shape[0])])

    # ------------------------------------------------------------------ recomputation
    def _recompute(self, kind: str, layers: list[int], fn: Callable[[int, torch.Tensor], None]) -> None:
        src = self._source
        if src is None:
            raise MonitorError("This compact trace cannot recompute its layers (no model attached).")
        lm, L = src.lm, self.shape[0]
        n = self.shape[1]
        wanted = set(layers)
        with lm.lock, NeuronHooks(lm, capture=kind == "attributions", keep_graph=kind == "attributions",
                                  interventions=src.compiled) as hooks:
            if kind == "activations":
                rows = src.objective.rows(src.ids) if src.objective is not None else src.ids[None]
                last = max(wanted)

                def tap(l: int, x: torch.Tensor) -> None:
                    if l in wanted:
                        fn(l, x[0, :n].float().cpu())
                    if l == last:
                        raise _Stop

                handles = _taps(lm, tap)
                try:
                    with torch.no_grad():
                        lm.model.model(input_ids=rows)
                except _Stop:
                    pass
                finally:
                    for h in handles:
                        h.remove()
                return
            rows = src.objective.rows(src.ids)
            with torch.enable_grad():
                hidden = lm.model.model(input_ids=rows).last_hidden_state
                f = src.objective.values(hidden, lm.model.get_output_embeddings(), n)[0]
                order = sorted(wanted)
                grads = torch.autograd.grad(f, [hooks.captured[l] for l in order])
            for l, g in zip(order, grads):
                a = hooks.captured[l][0, :n].detach()
                fn(l, _attribution(a, g[:, :n].sum(dim=0), src.scale).cpu())


def _attribution(acts: torch.Tensor, grad: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``a · ∂f/∂a`` (× ``scale``, the target probability of the "prob" kind) in float32."""
    attr = acts.float() * grad.float()
    return attr * scale if scale is not None else attr


def _taps(lm, fn: Callable[[int, torch.Tensor], None]) -> list:
    """Pre-hooks on every ``down_proj`` that hand ``fn(layer, neurons)`` the (steered) input; registered
    after :class:`NeuronHooks`, so they see what it passes on."""
    handles = []
    for i, layer in enumerate(lm.layers):
        def hook(module, args, i=i):
            fn(i, args[0])

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    return handles


def run_trace(
    lm,
    chat: Chat,
    target_index: int | None = None,
    attribution: str | None = None,
    interventions: list[Intervention] | None = None,
    quantiles=None,
    top_k_next: int = 5,
    add_generation_prompt: bool = True,
    rendered: RenderedChat | None = None,
    distractor=None,
    objective: Objective | None = None,
) -> Trace:
    """Trace ``chat`` through ``lm`` and return a :class:`Trace`.

    ``target_index`` (negative counts from the end) turns on attribution toward that
    token, with ``attribution`` choosing ``"logprob"`` (default) or ``"prob"``; asking
    for ``attribution`` without a target uses the last token. ``interventions`` steer
    the trace (activations and probabilities are the steered ones). ``distractor`` (a token
    string or id, :func:`engine.attribution.resolve_distractor`) makes the attribution
    contrastive; ``objective`` (with its ``rendered``, e.g. from
    :func:`engine.attribution.answer_objective`) replaces the target token altogether.
    """
    if rendered is None:
        rendered = render_chat(lm.tokenizer, chat, add_generation_prompt=add_generation_prompt, max_tokens=lm.max_context)
    n = len(rendered)
    if attribution is not None and attribution not in ATTRIBUTION_KINDS:
        raise MonitorError(f"Unknown attribution {attribution!r}; use logprob or prob.")
    if objective is not None or distractor is not None:
        if attribution == "prob":
            raise MonitorError("The prob attribution is for a single target token; a distractor or an answer "
                               "pair uses the log-prob difference.")
        attribution = "logprob"
    if objective is None and (target_index is not None or attribution is not None):
        attribution = attribution or "logprob"
        t = n - 1 if target_index is None else int(target_index)
        t = t + n if t < 0 else t
        if not 1 <= t < n:
            raise MonitorError(
                f"Target index {target_index} is out of range: pick a token 1..{n - 1} "
                "(token 0 has nothing before it to predict it)."
            )
        target_index = t
        objective = token_objective(lm.tokenizer, rendered.input_ids, t, distractor)
    compiled = compile_interventions(
        interventions or [], rendered, lm.n_layers, lm.n_neurons, quantiles, device=lm.device, dtype=lm.dtype
    )
    ids = rendered.input_ids[None].to(lm.device)  # [1, tokens]
    L, N = lm.n_layers, lm.n_neurons
    dense = L * n * N * 4 <= dense_budget_bytes()
    builder = None if dense else _Builder(L, n, N, attribution is not None)
    with lm.lock, NeuronHooks(lm, capture=dense or attribution is not None, keep_graph=attribution is not None,
                              interventions=compiled) as hooks:
        if attribution is None:
            handles = [] if dense else _taps(lm, lambda l, x: builder.add(l, x[0]))  # one layer alive at a time
            try:
                with torch.inference_mode() if dense else torch.no_grad():  # no_grad: the summaries stay normal tensors
                    logits = lm.model(input_ids=ids).logits[0]
            finally:
                for h in handles:
                    h.remove()
            acts = hooks.stacked()[:, 0] if dense else None
            grads = None
        else:
            # The graph starts at layer 0's neurons (the hooks make them a leaf), so the
            # backward skips the embeddings and layer 0's attention, and the LM head runs only
            # on the rows the objective reads: every position's logits (for the top-5 table)
            # come from the same final hidden states outside the graph.
            rows = objective.rows(ids[0])  # [rows, tokens + M]
            with torch.enable_grad():
                hidden = lm.model.model(input_ids=rows).last_hidden_state  # [rows, tokens + M, d]
                head = lm.model.get_output_embeddings()
                f = objective.values(hidden, head, n)[0]
                captured = [c for c in hooks.captured]
                grads = torch.autograd.grad(f, captured)
            with torch.inference_mode():
                logits = head(hidden[0, :n].detach())
            # a prompt neuron feeds every row: its gradient is the sum over rows
            grads = [g[:, :n].sum(dim=0) for g in grads]
            acts = [c[0, :n].detach() for c in captured]  # per layer [tokens, neurons]
            del captured, hidden
    probs = torch.softmax(logits.float(), dim=-1)  # [tokens, vocab]
    top = torch.topk(probs, min(top_k_next, probs.shape[-1]), dim=-1)
    top_next = [
        [(lm.tokenizer.decode([i]), float(p)) for i, p in zip(ix.tolist(), pv.tolist())]
        for ix, pv in zip(top.indices, top.values)
    ]
    next_prob = [None] + probs[torch.arange(n - 1), rendered.input_ids[1:].to(probs.device)].tolist()
    trace = Trace(
        rendered=rendered,
        activations=None,
        top_next=top_next,
        next_token_prob=next_prob,
        interventions=list(interventions or []),
    )
    scale = None
    if grads is not None:
        trace.objective, trace.objective_value = objective, float(f.detach())
        trace.attribution_kind = attribution if objective.kind == "token" else objective.kind
        if objective.target_index is not None:
            target_prob = float(probs[target_index - 1, rendered.input_ids[target_index]])
            if attribution == "prob":
                scale = target_prob
            trace.target_index = target_index
            trace.target_prob = target_prob
    if dense:
        if grads is None:
            trace.activations = acts.float().cpu()
        else:
            trace.activations = torch.stack(acts).float().cpu()
            trace.attributions = torch.stack([_attribution(a, g, scale) for a, g in zip(acts, grads)]).cpu()
        return trace
    if grads is not None:
        for l in range(L):  # one layer's attribution alive at a time
            builder.add(l, acts[l], _attribution(acts[l], grads[l], scale))
            acts[l] = grads[l] = None
    trace.compact = builder.store()
    trace._source = _Source(lm, rendered.input_ids.to(lm.device), compiled, objective, scale)
    return trace
