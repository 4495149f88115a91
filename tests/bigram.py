"""A Llama whose next-token distribution is set by hand: a character-level bigram model.

Every attention and MLP output is zero, so the residual stream at the last layer is the token's
own embedding; embeddings are one-hot (times ``SCALE``) and the final RMSNorm scales them back to
one-hot, so ``logits = W_head[:, token]``, which we set to ``log p(next | token)``. The model is
a real ``LlamaForCausalLM`` with a real fast tokenizer (one token per character, a small chat
template), saved and loaded through :func:`engine.loader.load_model` like any checkpoint.

One extra hidden dimension and one MLP neuron (``PLANT_LAYER``, ``PLANT_NEURON``) make a planted
intervention: the neuron is silent (its gate and up weights are 0) until a steering intervention
*replaces* its activation with ``a``; its ``down_proj`` column writes ``a`` into the extra
dimension, which the LM head reads as a bonus of ``a × BONUS_PER_UNIT`` nats on the
end-of-answer tokens. Every other neuron writes nothing, so a random control moves nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list("0123456789.?: abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n,")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SCALE = 10.0
FLOOR = -40.0  # log-probability of everything a row does not list (≈ 4e-18 each)
PLANT_LAYER, PLANT_NEURON, N_NEURONS, N_LAYERS = 1, 3, 8, 2
BONUS_PER_UNIT = 1000.0  # LM-head weight of the extra dimension on the end token

# log p(next | token), as probabilities; "END" is <|end|>, the end-of-answer token.
ROWS = {
    "<|assistant|>": {"5": 0.5, "3": 0.5},
    "3": {".": 1.0},  # every decimal answer is "3.…"
    ".": {"1": 0.25, "4": 0.25, "8": 0.25, "2": 0.25},
    # the tie: P("5" then end) = 0.2 = P("5", "6", then end) = 0.4 × 0.5
    "5": {"END": 0.2, "6": 0.4, "0": 0.4},
    "6": {"END": 0.5, "0": 0.5},
    # prefix pairs: "3.4" beats "3.47" (0.6 against 0.3 × 0.9); "3.1" loses to "3.17" (0.1 against 0.8 × 0.9)
    "4": {"END": 0.6, "7": 0.3, "0": 0.1},
    "1": {"END": 0.1, "7": 0.8, "0": 0.1},
    "7": {"END": 0.9, "0": 0.1},
    # the planted task: "3.8" (correct) loses to "3.89" (0.001 against 0.9 × 0.5) unless the end gets a bonus
    "8": {"9": 0.9, "END": 0.001, "0": 0.099},
    "9": {"END": 0.5, "0": 0.5},
}


def build(path: Path) -> Path:
    """Write the tokenizer and model to ``path`` (a normal Hugging Face folder) and return it."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|end|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", unk_token="<|end|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = TEMPLATE
    v = len(vocab)
    d = v + 1  # one dimension per token, and the planted neuron's
    d += d % 2  # (even, for the rotary embedding's sake; the spare dimension stays 0)
    cfg = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=N_NEURONS, num_hidden_layers=N_LAYERS,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=vocab["<|end|>"], bos_token_id=vocab["<|end|>"],
                      rms_norm_eps=1e-12)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :v] = torch.eye(v) * SCALE
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        # RMS of SCALE·e_i over d dims is SCALE/sqrt(d): the norm maps it back to e_i with weight 1/sqrt(d).
        model.model.norm.weight.fill_(1.0 / math.sqrt(d))
        head = torch.zeros(v, d)
        head[:, :v] = FLOOR
        for tok_text, row in ROWS.items():
            i = vocab[tok_text]
            head[:, i] = FLOOR
            for nxt, p in row.items():
                head[vocab["<|end|>" if nxt == "END" else nxt], i] = math.log(p)
        # The norm maps SCALE·e_i + a·e_extra to ≈ e_i + (a/SCALE)·e_extra (a ≪ SCALE): a bonus of a·BONUS_PER_UNIT.
        head[vocab["<|end|>"], v] = BONUS_PER_UNIT * SCALE
        model.lm_head.weight.copy_(head)
        model.model.layers[PLANT_LAYER].mlp.down_proj.weight[v, PLANT_NEURON] = 1.0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def log_p(prev: str, nxt: str) -> float:
    """The hand-set log p(next | prev) (END for the end token); FLOOR when not listed."""
    p = ROWS.get(prev, {}).get(nxt)
    return math.log(p) if p else FLOOR
