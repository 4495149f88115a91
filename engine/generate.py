"""Generation with and without neuron interventions.

A small decoding loop over the model's KV cache, so the steering hooks always know the
absolute position of each token (``NeuronHooks.offset``): prompt positions get the
prompt-range interventions, later positions the "generated tokens" ones. Temperature 0
is greedy; otherwise sampling uses a ``torch.Generator`` seeded with ``seed``, so the
same seed gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from .chat import Chat, RenderedChat, render_chat
from .errors import MonitorError
from .hooks import NeuronHooks
from .steering import Intervention, compile_interventions


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
