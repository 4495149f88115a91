"""Benchmark: trace and attribution cost relative to a bare forward, and against nnsight.

``python -m benchmarks.trace --json`` prints one JSON object. All timings are medians of
``--repeats`` runs in this process on the same prompt, after a warm-up, so the ratios
are robust to a noisy machine:

* ``forward_s``: bare ``model(input_ids)`` under ``torch.inference_mode``.
* ``capture_ratio``: ``run_trace`` (all activations ``[layers, tokens, neurons]`` plus
  top-5 next-token probabilities) ÷ ``forward_s``. Target ≤ 1.10.
* ``attribution_ratio``: ``run_trace`` with attribution (one forward + one backward) ÷
  ``forward_s``. Target ≤ 2.5.
* ``contrastive_ratio``: ``run_trace`` with a distractor (``log p(target) − log p(runner-up)``,
  still one forward + one backward) ÷ ``forward_s``. Target ≤ 2.5, as single-target.
* ``lint_causal_s``: the linter's causal check (:func:`engine.linter.causal_check`: every cluster
  suppressed, plus 20 matched random sets each, batched and KV-cached) on a 40-token chat with a
  contrastive target. With ``--db`` (the model's neuron database) the clusters are the linter's
  own; without one, the top-1000 attribution cells' neurons in chunks of 8 stand in for
  ``--clusters`` clusters (the cost depends on their number and size, not on their meaning).
  Target ≤ 20 s on 2 cores. ``lint_causal_ratio`` = ``lint_causal_s ÷ forward_s`` (the same
  chat), the machine-independent form: how many bare forwards the whole check costs.
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
LINT_CHAT = PROMPT  # 45 tokens with the embedded model's template and default system prompt


def median_time(fn, repeats: int, warm_up: bool = True) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` (after one untimed call with ``warm_up``)."""
    if warm_up:
        fn()
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


def lint_causal(lm, db_path: str | None = None, clusters: int = 6, per: int = 8, n_null: int = 20) -> dict:
    """Time :func:`engine.linter.causal_check` once on :data:`LINT_CHAT` (module docstring), the
    target its last token contrasted with the model's runner-up there."""
    from engine.linter import Cluster, LintReport, causal_check, important_neurons

    rendered = render_chat(lm.tokenizer, LINT_CHAT)
    fwd = run_trace(lm, LINT_CHAT, rendered=rendered)
    target = len(rendered) - 1
    runner_up = next(t for t, _ in fwd.top_next[target - 1] if t != rendered.tokens[target])
    trace = run_trace(lm, LINT_CHAT, rendered=rendered, target_index=target, distractor=runner_up)
    if db_path:
        from cache.db import open_database
        from concepts.lint import lint_trace

        report = lint_trace(open_database(db_path, model=lm.name), trace, labeler=None)
        source = "database clusters"
    else:
        hits = important_neurons(trace)
        report = LintReport("attribution", [
            Cluster(i, hits[i * per:(i + 1) * per], [""] * per, 0.0, f"chunk {i}", [], "", 1.0)
            for i in range(min(clusters, len(hits) // per))], len(hits), 0, 0.6, 3)
        source = f"top attribution neurons in chunks of {per}"
    t0 = time.perf_counter()
    causal_check(lm, trace, report, n_null=n_null)
    seconds = time.perf_counter() - t0
    return {"lint_causal_s": round(seconds, 3), "lint_tokens": len(rendered), "lint_clusters": len(report.clusters),
            "lint_cluster_neurons": sum(len(c.members) for c in report.clusters), "lint_null_sets": n_null,
            "lint_forwards": report.causal["groups"] + 1, "lint_source": source}


def run(model: str = "embedded", repeats: int = 7, with_nnsight: bool = True, db: str | None = None) -> dict:
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
    contrastive_s = median_time(lambda: run_trace(lm, PROMPT, target_index=target, rendered=rendered,
                                                  distractor="id:0"), repeats)
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
        "contrastive_s": round(contrastive_s, 5),
        "contrastive_ratio": round(contrastive_s / forward_s, 3),
        "targets": {"capture_ratio": 1.10, "attribution_ratio": 2.5, "contrastive_ratio": 2.5, "nnsight_ratio": 0.8,
                    "lint_causal_s": 20.0},
    }
    out.update(lint_causal(lm, db))
    out["lint_causal_ratio"] = round(out["lint_causal_s"] / forward_s, 2)
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
    p.add_argument("--db", default=None, help="neuron database for the linter's own clusters (lint_causal_s)")
    p.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    args = p.parse_args()
    print(json.dumps(run(args.model, args.repeats, not args.no_nnsight, args.db), indent=None if args.json else 2))


if __name__ == "__main__":
    main()
