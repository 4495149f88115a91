"""Synthetic Llama checkpoints with a real model's neuron count, for scale rehearsals on a CPU.

``python -m engine synth --shape llama-3.1-8b-neurons --out DIR`` writes a normal Hugging Face
folder (``config.json``, ``model.safetensors``, the tokenizer and its chat template) that
:func:`engine.loader.load_model` loads like any checkpoint. Its MLPs have the target model's
shape (32 layers × 14,336 neurons = 458,752 for Llama-3.1-8B), but the residual stream is
small (``--hidden``, 256 by default) and the attention has few heads, so a forward costs a
small fraction of the real model's and the whole product (precompute, database, search,
trace, steering, linter, experiments) can run at the real neuron count on a laptop CPU.

Both shapes share one synthetic family (same hidden size, heads, init and tokenizer), so a
benchmark comparing ``embedded-neurons`` (SmolLM2's 30 × 1,536 = 46,080) with
``llama-3.1-8b-neurons`` measures what the neuron count costs and nothing else.

The weights are random (``torch.manual_seed(--seed)``, normal init with std
``initializer_range`` = 0.02, as Llama's config prescribes), untied from the input
embeddings. The tokenizer (and its vocabulary size) is the embedded model's (SmolLM2),
converted once by :func:`engine.loader.ensure_embedded_model`. :func:`check_activations`
checks that the MLP neurons of such a model are finite and varied (not degenerate).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MonitorError


@dataclass(frozen=True)
class Shape:
    """The MLP shape a synthetic model copies: ``n_layers`` × ``intermediate_size`` neurons."""

    name: str
    n_layers: int
    intermediate_size: int
    copies: str

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.intermediate_size


SHAPES = {
    "llama-3.1-8b-neurons": Shape("llama-3.1-8b-neurons", 32, 14336, "Llama-3.1-8B (32 layers × 14,336)"),
    "embedded-neurons": Shape("embedded-neurons", 30, 1536, "SmolLM2-135M, the embedded model (30 layers × 1,536)"),
}
DEFAULT_HIDDEN = 256
HEAD_DIM = 64
MAX_POSITIONS = 2048


def shape(name: str) -> Shape:
    """The :class:`Shape` called ``name``, or a one-line :class:`MonitorError`."""
    if name not in SHAPES:
        raise MonitorError(f"Unknown shape {name!r}: use one of {', '.join(SHAPES)}.")
    return SHAPES[name]


def synth_config(sh: Shape, hidden: int, vocab_size: int, special: dict):
    """The LlamaConfig of a synthetic model: ``sh``'s MLPs, a ``hidden``-wide residual stream,
    ``hidden / 64`` query heads of 64 dimensions (4 at the default 256) and half as many KV heads."""
    from transformers import LlamaConfig

    if hidden < HEAD_DIM * 2 or hidden % HEAD_DIM:
        raise MonitorError(f"--hidden must be a multiple of {HEAD_DIM} and at least {HEAD_DIM * 2} (got {hidden}).")
    n_heads = hidden // HEAD_DIM
    n_kv = max(1, n_heads // 2)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=sh.intermediate_size,
        num_hidden_layers=sh.n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=HEAD_DIM,
        hidden_act="silu", max_position_embeddings=MAX_POSITIONS, initializer_range=0.02, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, **special,
    )


def build_model(sh: Shape, hidden: int = DEFAULT_HIDDEN, seed: int = 0, tokenizer=None):
    """A random-weight ``LlamaForCausalLM`` of shape ``sh`` (fp32, eval mode) and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .loader import ensure_embedded_model

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_model()), local_files_only=True)
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tokenizer, k, None) is not None}
    config = synth_config(sh, hidden, len(tokenizer), special)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # _init_weights: normal(0, initializer_range), RMSNorm weights 1
    model.eval()
    return model, tokenizer


def write_model(shape_name: str, out: str | Path, hidden: int = DEFAULT_HIDDEN, seed: int = 0,
                force: bool = False) -> Path:
    """Write the synthetic model ``shape_name`` to the folder ``out`` (atomically: a temporary
    folder beside it, then a rename) and return ``out``. An existing model folder is kept unless
    ``force``; any other existing path is refused."""
    sh = shape(shape_name)
    out = Path(out).expanduser()
    if out.exists():
        if (out / "config.json").exists() and (out / "synth.json").exists() and not force:
            return out
        if not force:
            raise MonitorError(f"{out} exists and is not a synthetic model folder; pick another --out or add --force.")
    model, tokenizer = build_model(sh, hidden, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # with chat_template.jinja
        info = {"shape": sh.name, "copies": sh.copies, "n_layers": sh.n_layers,
                "intermediate_size": sh.intermediate_size, "n_neurons": sh.n_neurons, "hidden_size": hidden,
                "seed": seed, "tokenizer": "SmolLM2-135M-Instruct (the embedded model's)",
                "n_parameters": sum(p.numel() for p in model.parameters())}
        (tmp / "synth.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_activations(lm, text: str = "The quick brown fox jumps over the lazy dog. 9.8 or 9.11?") -> dict:
    """Run ``text`` through ``lm`` and summarise its MLP neurons: whether every activation is
    finite, their standard deviation, the fraction of exact zeros and the smallest per-layer
    std. Raises :class:`MonitorError` when they are degenerate (non-finite, or constant)."""
    from .hooks import NeuronHooks

    ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
    with torch.inference_mode(), NeuronHooks(lm, capture=True) as hooks:
        lm.model.model(input_ids=ids)
        acts = torch.stack([a[0].float() for a in hooks.captured])  # [layers, tokens, neurons]
    per_layer_std = acts.flatten(1).std(1)
    out = {"finite": bool(torch.isfinite(acts).all()), "std": float(acts.std()),
           "min_layer_std": float(per_layer_std.min()), "zero_fraction": float((acts == 0).float().mean()),
           "abs_max": float(acts.abs().max())}
    if not out["finite"] or out["min_layer_std"] < 1e-6:
        raise MonitorError(f"The synthetic model's activations are degenerate: {out}.")
    return out
