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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .activation_view import top_cells
from .attribution import Objective, token_objective
from .chat import Chat, RenderedChat, render_chat
from .errors import MonitorError
from .hooks import NeuronHooks
from .steering import Intervention, compile_interventions

ATTRIBUTION_KINDS = ("logprob", "prob")


@dataclass
class Trace:
    rendered: RenderedChat
    activations: torch.Tensor  # [layers, tokens, neurons] float32, CPU
    top_next: list[list[tuple[str, float]]]  # per position, the top-k next tokens and probabilities
    next_token_prob: list[float | None]  # per position t, p(x_t | x_<t); None at t = 0
    attributions: torch.Tensor | None = None  # [layers, tokens, neurons] float32, CPU
    attribution_kind: str | None = None
    target_index: int | None = None
    target_prob: float | None = None
    interventions: list[Intervention] = field(default_factory=list)
    objective: Objective | None = None  # what the attribution differentiates (engine.attribution)
    objective_value: float | None = None  # its value f on this trace

    @property
    def tokens(self) -> list[str]:
        return self.rendered.tokens

    def top_activations(self, k: int = 20, skip_tokens: tuple[int, ...] = (0,), view=None) -> list[dict]:
        """The ``k`` (layer, neuron, token) cells with the largest |activation|
        (:func:`engine.activation_view.top_cells`; token 0, the attention sink, left out by
        default). ``view`` (an :class:`~engine.activation_view.ActivationView`) normalises first."""
        return top_cells(self.activations, k, skip_tokens, view)

    def top_attributions(self, k: int = 20) -> list[dict]:
        if self.attributions is None:
            raise MonitorError("This trace has no attribution: pass a target index.")
        return top_cells(self.attributions, k, ())


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
    with lm.lock, NeuronHooks(lm, capture=True, keep_graph=attribution is not None, interventions=compiled) as hooks:
        if attribution is None:
            with torch.inference_mode():
                logits = lm.model(input_ids=ids).logits[0]
            acts = hooks.stacked()[:, 0]
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
            acts = torch.stack([c[0, :n].detach() for c in captured])  # [layers, tokens, neurons]
            # a prompt neuron feeds every row: its gradient is the sum over rows
            grads = torch.stack([g[:, :n].sum(dim=0) for g in grads])
    probs = torch.softmax(logits.float(), dim=-1)  # [tokens, vocab]
    top = torch.topk(probs, min(top_k_next, probs.shape[-1]), dim=-1)
    top_next = [
        [(lm.tokenizer.decode([i]), float(p)) for i, p in zip(ix.tolist(), pv.tolist())]
        for ix, pv in zip(top.indices, top.values)
    ]
    next_prob = [None] + probs[torch.arange(n - 1), rendered.input_ids[1:].to(probs.device)].tolist()
    trace = Trace(
        rendered=rendered,
        activations=acts.float().cpu(),
        top_next=top_next,
        next_token_prob=next_prob,
        interventions=list(interventions or []),
    )
    if grads is not None:
        attr = acts.float() * grads.float()
        trace.objective, trace.objective_value = objective, float(f.detach())
        trace.attribution_kind = attribution if objective.kind == "token" else objective.kind
        if objective.target_index is not None:
            target_prob = float(probs[target_index - 1, rendered.input_ids[target_index]])
            if attribution == "prob":
                attr = attr * target_prob
            trace.target_index = target_index
            trace.target_prob = target_prob
        trace.attributions = attr.cpu()
    return trace
