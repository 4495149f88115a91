"""Generation with and without neuron interventions.

Provides :func:`generate` (one reply), :func:`generate_pair` (unsteered and steered),
:func:`sequence_logprob`, and what steering changes: :class:`GenerationDiff` /
:func:`compare_generations` (side-by-side greedy replies, differing tokens marked) and
:func:`answer_probabilities` (candidate answers before and after steering).

A small decoding loop over the model's KV cache, so the steering hooks always know the
absolute position of each token (``NeuronHooks.offset``): prompt positions get the
prompt-range interventions, later positions the "generated tokens" ones. Temperature 0
is greedy; otherwise sampling uses a ``torch.Generator`` seeded with ``seed``, so the
same seed gives the same text.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from .chat import Chat, RenderedChat, render_chat
from .errors import MonitorError
from .hooks import NeuronHooks
from .steering import Intervention, check_quantiles, compile_interventions


@dataclass
class Generation:
    prompt_len: int
    token_ids: list[int]  # generated ids only
    tokens: list[str]  # decoded per token
    text: str
    steered: bool


def eos_ids(lm) -> set[int]:
    ids = set()
    cfg_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for v in (cfg_eos, lm.tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def generate(
    lm,
    chat: Chat,
    max_new_tokens: int = 64,
    interventions: list[Intervention] | None = None,
    quantiles=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    on_token: Callable[[str], None] | None = None,
    rendered: RenderedChat | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` after ``chat``'s generation prompt.

    ``on_token`` is called with each new token's text (for streaming). Stops at an
    end-of-sequence token or the model's context limit.
    """
    if max_new_tokens < 0:
        raise MonitorError("max_new_tokens must be 0 or more.")
    if temperature < 0:
        raise MonitorError("Temperature must be 0 (greedy) or more.")
    rendered = rendered or render_chat(lm.tokenizer, chat, add_generation_prompt=True, max_tokens=lm.max_context)
    compiled = compile_interventions(
        interventions or [], rendered, lm.n_layers, lm.n_neurons, quantiles, device=lm.device, dtype=lm.dtype
    )
    stop = eos_ids(lm)
    gen = torch.Generator(device=lm.device)
    gen.manual_seed(int(seed or 0))
    budget = min(max_new_tokens, lm.max_context - len(rendered))
    out: list[int] = []
    ids = rendered.input_ids[None].to(lm.device)
    cache = DynamicCache()
    with lm.lock, torch.inference_mode(), NeuronHooks(lm, interventions=compiled) as hooks:
        offset = 0
        for _ in range(budget):
            hooks.offset = offset
            logits = lm.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].float()
            offset += ids.shape[1]
            nxt = _pick(logits, temperature, top_p, gen)
            out.append(nxt)
            if on_token is not None:
                on_token(lm.tokenizer.decode([nxt]))
            if nxt in stop:
                break
            ids = torch.tensor([[nxt]], device=lm.device)
    text = lm.tokenizer.decode([i for i in out if i not in stop], skip_special_tokens=True)
    return Generation(len(rendered), out, [lm.tokenizer.decode([i]) for i in out], text, bool(compiled))


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_pair(lm, chat: Chat, interventions: list[Intervention], quantiles=None, **kwargs) -> tuple[Generation, Generation]:
    """Unsteered and steered generations of the same prompt, side by side."""
    rendered = render_chat(lm.tokenizer, chat, add_generation_prompt=True, max_tokens=lm.max_context)
    base = generate(lm, chat, rendered=rendered, **kwargs)
    steered = generate(lm, chat, interventions=interventions, quantiles=quantiles, rendered=rendered, **kwargs)
    return base, steered


def sequence_logprob(lm, chat: Chat, continuation: str, interventions=None, quantiles=None, prefix: str = "") -> float:
    """log p(``prefix`` + ``continuation`` tokens | chat) summed over ``continuation``'s tokens.

    The continuation is appended to the rendered generation prompt (after ``prefix``,
    e.g. an assistant answer stem); interventions apply to the prompt's range and, with
    ``generated=True``, to the appended tokens too.
    """
    rendered = render_chat(lm.tokenizer, chat, add_generation_prompt=True, max_tokens=lm.max_context)
    pre = lm.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    full = lm.tokenizer(prefix + continuation, add_special_tokens=False)["input_ids"]
    if not continuation or len(full) <= len(pre):
        raise MonitorError("The answer candidate is empty: type the text whose probability you want.")
    compiled = compile_interventions(
        interventions or [], rendered, lm.n_layers, lm.n_neurons, quantiles, device=lm.device, dtype=lm.dtype
    )
    ids = torch.cat([rendered.input_ids, torch.tensor(full, dtype=torch.long)])[None].to(lm.device)
    n = len(rendered)
    first = n + len(pre) if full[: len(pre)] == pre else n
    with lm.lock, torch.inference_mode(), NeuronHooks(lm, interventions=compiled):
        logits = lm.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[first - 1 : -1], dim=-1)
    return float(logp.gather(1, ids[0, first:, None]).sum())


@dataclass
class GenerationDiff:
    """Unsteered vs steered greedy generations with the differing tokens marked.

    ``base_changed[i]`` / ``steered_changed[i]`` are True for tokens outside the longest
    matching blocks of the two token-id sequences (difflib), i.e. what steering changed.
    """

    base: object  # engine.generate.Generation
    steered: object
    base_changed: list[bool]
    steered_changed: list[bool]
    first_divergence: int | None  # index of the first differing token; None if identical

    def to_dict(self) -> dict:
        return {
            "base": {"text": self.base.text, "tokens": self.base.tokens, "changed": self.base_changed},
            "steered": {"text": self.steered.text, "tokens": self.steered.tokens, "changed": self.steered_changed},
            "first_divergence": self.first_divergence,
        }


def diff_tokens(a: Sequence[int], b: Sequence[int]) -> tuple[list[bool], list[bool], int | None]:
    """Per-token "changed" flags for two sequences and the first index where they differ."""
    a, b = list(a), list(b)
    ca, cb = [True] * len(a), [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            ca[block.a + i] = False
            cb[block.b + i] = False
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return ca, cb, first


def compare_generations(lm, chat, interventions: Sequence[Intervention], quantiles=None,
                        max_new_tokens: int = 32, **kwargs) -> GenerationDiff:
    """Greedy unsteered and steered generations of ``chat`` side by side, differences marked."""
    check_quantiles(interventions, quantiles)
    base, steered = generate_pair(lm, chat, list(interventions), quantiles=quantiles,
                                  max_new_tokens=max_new_tokens, **kwargs)
    ca, cb, first = diff_tokens(base.token_ids, steered.token_ids)
    return GenerationDiff(base, steered, ca, cb, first)


def answer_probabilities(lm, chat, candidates: Sequence[str], interventions: Sequence[Intervention],
                         quantiles=None, prefix: str = "") -> list[dict]:
    """Each candidate answer's probability before and after steering.

    ``logprob`` is the complete-answer log-probability ``L(c)`` of :mod:`engine.scoring` (the
    candidate's tokens after the chat and ``prefix``, then a token that ends the answer), the same
    score the experiments use: length-neutral, and a prefix does not collect its continuations.
    ``share`` is the probability among the candidates, ``exp(L_i) / Σ_j exp(L_j)``. Steering
    covers the stem and the candidates only when a token range says ``+generated``.
    """
    from .scoring import answer_logprobs

    cands = [str(c) for c in candidates]
    if not cands or any(not c.strip() for c in cands):
        raise MonitorError("Give at least one non-empty answer candidate.")
    check_quantiles(interventions, quantiles)
    before = answer_logprobs(lm, chat, cands, prefix=prefix)
    after = answer_logprobs(lm, chat, cands, list(interventions), quantiles, prefix=prefix)

    def share(lp):
        e = np.exp(lp - lp.max())
        return e / e.sum()

    sb, sa = share(before), share(after)
    return [{"candidate": c, "logprob_before": float(b), "logprob_after": float(a), "prob_before": float(np.exp(b)),
             "prob_after": float(np.exp(a)), "share_before": float(x), "share_after": float(y),
             "delta_logprob": float(a - b)}
            for c, b, a, x, y in zip(cands, before, after, sb, sa)]
