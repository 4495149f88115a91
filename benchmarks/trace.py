"""Benchmark: trace and attribution cost relative to a bare forward, and against nnsight.

``python -m benchmarks.trace --json`` prints one JSON object. All timings are medians of
``--repeats`` runs in this process on the same prompt, after a warm-up, so the ratios
are robust to a noisy machine:

* ``forward_s``: bare ``model(input_ids)`` under ``torch.inference_mode``.
* ``capture_ratio``: ``run_trace`` (all activations ``[layers, tokens, neurons]`` plus
  top-5 next-token probabilities) ÷ ``forward_s``. Target ≤ 1.10.
* ``attribution_ratio``: ``run_trace`` with attribution (one forward + one backward) ÷
  ``forward_s``. Target ≤ 2.5.
* ``nnsight_ratio``: our capture + attribution time ÷ nnsight's for the same quantities
  on the same input. Target ≤ 0.8. ``nnsight_max_abs_diff_*`` checks they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from engine.chat import render_chat  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.trace import run_trace  # noqa: E402

PROMPT = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nnsight_trace(nn_model, ids, n_layers: int, target: int | None):
    """Activations (and activation × ∂log p/∂activation) with nnsight, as ``[layers, tokens, neurons]``."""
    import nnsight

    with nn_model.trace(ids):
        if target is not None:
            nn_model.model.embed_tokens.output.requires_grad_(True)
        acts = nnsight.save([])
        for i in range(n_layers):
            acts.append(nn_model.model.layers[i].mlp.down_proj.input)
        if target is not None:
            logits = nn_model.output.logits
            logp = torch.log_softmax(logits[0, target - 1].float(), -1)[ids[0, target]]
            grads = nnsight.save([])
            with logp.backward():
                for a in reversed(acts):
                    grads.append(a.grad)
    a = torch.stack([x.detach()[0] for x in acts])
    if target is None:
        return a, None
    return a, a * torch.stack([g[0] for g in reversed(grads)])


def run(model: str = "embedded", repeats: int = 7, with_nnsight: bool = True) -> dict:
    torch.manual_seed(0)
    lm = load_model(model)
    rendered = render_chat(lm.tokenizer, PROMPT)
    ids = rendered.input_ids[None].to(lm.device)
    target = len(rendered) - 1

    def bare():
        with torch.inference_mode():
            lm.model(input_ids=ids)

    forward_s = median_time(bare, repeats)
    capture_s = median_time(lambda: run_trace(lm, PROMPT, rendered=rendered), repeats)
    attribution_s = median_time(lambda: run_trace(lm, PROMPT, target_index=target, rendered=rendered), repeats)
    out = {
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "tokens": len(rendered),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "forward_s": round(forward_s, 5),
        "capture_s": round(capture_s, 5),
        "attribution_s": round(attribution_s, 5),
        "capture_ratio": round(capture_s / forward_s, 3),
        "attribution_ratio": round(attribution_s / forward_s, 3),
        "targets": {"capture_ratio": 1.10, "attribution_ratio": 2.5, "nnsight_ratio": 0.8},
    }
    if with_nnsight:
        from nnsight import NNsight

        nn_model = NNsight(lm.model)
        nn_cap_s = median_time(lambda: nnsight_trace(nn_model, ids, lm.n_layers, None), repeats)
        nn_attr_s = median_time(lambda: nnsight_trace(nn_model, ids, lm.n_layers, target), repeats)
        ours = run_trace(lm, PROMPT, target_index=target, rendered=rendered)
        nn_acts, nn_attr = nnsight_trace(nn_model, ids, lm.n_layers, target)
        out.update(
            nnsight_capture_s=round(nn_cap_s, 5),
            nnsight_attribution_s=round(nn_attr_s, 5),
            nnsight_ratio=round((capture_s + attribution_s) / (nn_cap_s + nn_attr_s), 3),
            nnsight_max_abs_diff_activations=float((nn_acts.float().cpu() - ours.activations).abs().max()),
            nnsight_max_abs_diff_attributions=float((nn_attr.float().cpu() - ours.attributions).abs().max()),
            max_abs_attribution=float(ours.attributions.abs().max()),
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-nnsight", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    args = p.parse_args()
    print(json.dumps(run(args.model, args.repeats, not args.no_nnsight), indent=None if args.json else 2))


if __name__ == "__main__":
    main()
