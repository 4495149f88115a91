"""Contrastive and answer-level attribution, and measured suppression effects, against independent computations.

Finite differences: float64 copies of the models (``lm64``, ``tiny_lm64``), central differences
with ε = 1e-4, the same tolerance as the single-target test in test_engine.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.attribution import answer_objective
from engine.effects import faithfulness, predicted_effect, suppression_effects
from engine.errors import MonitorError
from engine.scoring import boundary_masks
from engine.trace import run_trace

from .conftest import ROOT

CHAT = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]


def _perturbed_logits(lm, ids, layer, token, neuron, delta):
    """Full-vocabulary logits [rows, tokens, V] with ``delta`` added to one neuron's activation."""

    def hook(module, args):
        x = args[0].clone()
        x[:, token, neuron] += delta
        return (x,)

    h = lm.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids).logits
    finally:
        h.remove()


def _contrast(lm, ids, target, distractor_id, cell, delta):
    logp = torch.log_softmax(_perturbed_logits(lm, ids, *cell, delta)[0, target - 1], -1)
    return (logp[ids[0, target]] - logp[distractor_id]).item()


def _complete_logprob(lm, prompt_ids, cand, boundary, cell, delta):
    """L(c) by hand: Σ log p(c_i | …) + log Σ_{t∈B} p(t | …, c), one full forward of prompt + c."""
    ids = torch.tensor([prompt_ids + cand])
    logp = torch.log_softmax(_perturbed_logits(lm, ids, *cell, delta)[0], -1)
    n = len(prompt_ids)
    total = sum(logp[n - 1 + i, c].item() for i, c in enumerate(cand))
    return total + torch.logsumexp(logp[n - 1 + len(cand)][boundary], 0).item()


def _cells(trace, extra, which):
    """The top attribution cells and fixed early/middle/late ones (fewer on the embedded model: each
    costs two float64 forwards of 135M parameters)."""
    top = trace.top_attributions(3 if which.startswith("tiny") else 1)
    return [(r["layer"], r["token_index"], r["neuron"]) for r in top] + extra[: 3 if which.startswith("tiny") else 2]


@pytest.mark.parametrize("which", ["tiny_lm64", "lm64"])
def test_contrastive_attribution_matches_central_finite_difference(which, request):
    model = request.getfixturevalue(which)
    trace = run_trace(model, CHAT, target_index=-4, distractor=" 8")
    obj = trace.objective
    assert obj.kind == "contrast" and obj.distractor_id != obj.target_id
    ids = trace.rendered.input_ids[None]
    t = trace.target_index
    L = model.n_layers
    eps = 1e-4
    for layer, token, neuron in _cells(trace, [(0, t - 2, 17), (L // 2, t - 1, 50), (L - 1, 5, 3)], which):
        cell = (layer, token, neuron)
        fd = (_contrast(model, ids, t, obj.distractor_id, cell, eps)
              - _contrast(model, ids, t, obj.distractor_id, cell, -eps)) / (2 * eps)
        fd *= trace.activations[layer, token, neuron].item()
        assert trace.attributions[layer, token, neuron].item() == pytest.approx(fd, rel=1e-4, abs=1e-9), cell


def test_contrastive_is_difference_of_single_targets_and_antisymmetric(tiny_lm64):
    """A(target vs d) = A(target) − A(d as target), and swapping the two negates it exactly (float64)."""
    base = run_trace(tiny_lm64, CHAT, target_index=-4)
    t = base.target_index
    tid = int(base.rendered.input_ids[t])
    did = int(tiny_lm64.tokenizer(" 8", add_special_tokens=False)["input_ids"][0])
    contrast = run_trace(tiny_lm64, CHAT, target_index=t, distractor=did)
    # the distractor as the target: the same prompt with token t replaced (tokens after t cannot matter)
    swapped_ids = base.rendered.input_ids.clone()
    swapped_ids[t] = did
    from dataclasses import replace

    swapped = replace(base.rendered, input_ids=swapped_ids)
    as_target = run_trace(tiny_lm64, CHAT, target_index=t, rendered=swapped)
    torch.testing.assert_close(contrast.attributions[:, :t], (base.attributions - as_target.attributions)[:, :t],
                               rtol=1e-5, atol=1e-6)
    reverse = run_trace(tiny_lm64, CHAT, target_index=t, rendered=swapped, distractor=tid)
    torch.testing.assert_close(reverse.attributions[:, :t], -contrast.attributions[:, :t], rtol=1e-5, atol=1e-6)
    assert contrast.attributions[:, :t].abs().max() > 0


@pytest.mark.parametrize("which", ["tiny_lm64", "lm64"])
def test_answer_level_attribution_matches_central_finite_difference(which, request):
    model = request.getfixturevalue(which)
    stem = "The bigger number is "
    rendered, obj = answer_objective(model, CHAT, "9.8", "9.11", stem)
    trace = run_trace(model, CHAT, rendered=rendered, objective=obj)
    assert trace.attribution_kind == "answer" and trace.target_index is None
    assert trace.attributions.shape[1] == len(rendered) == len(trace.tokens)
    prompt = rendered.input_ids.tolist()
    masks = boundary_masks(model)
    a, b = obj.continuations
    n = len(prompt)

    def f(cell, delta):
        return (_complete_logprob(model, prompt, a, masks.for_candidate("9.8"), cell, delta)
                - _complete_logprob(model, prompt, b, masks.for_candidate("9.11"), cell, delta))

    assert trace.objective_value == pytest.approx(f((0, 0, 0), 0.0), rel=1e-6, abs=1e-9)
    eps = 1e-4
    L = model.n_layers
    for layer, token, neuron in _cells(trace, [(0, n - 2, 17), (L // 2, n - 1, 50), (L - 1, 5, 3)], which):
        cell = (layer, token, neuron)
        fd = trace.activations[layer, token, neuron].item() * (f(cell, eps) - f(cell, -eps)) / (2 * eps)
        assert trace.attributions[layer, token, neuron].item() == pytest.approx(fd, rel=1e-4, abs=1e-9), cell


def test_suppression_effect_equals_hand_computed_forward(tiny_lm):
    """Δf of zeroing one cell (batched, KV-cached) = a plain forward with that activation set to 0."""
    trace = run_trace(tiny_lm, CHAT, target_index=-3, distractor=" 8")
    ids = trace.rendered.input_ids[None]
    t, did = trace.target_index, trace.objective.distractor_id
    cells = [(1, t - 1, 7), (2, t - 3, 40), (0, 4, 11)]
    groups = [[c] for c in cells] + [cells]
    got = suppression_effects(tiny_lm, trace, groups, batch_size=2)

    def f(zeroed):
        def mk(token, neuron):
            def hook(module, args):
                x = args[0].clone()
                x[:, token, neuron] = 0
                return (x,)
            return hook

        hs = [tiny_lm.layers[l].mlp.down_proj.register_forward_pre_hook(mk(tok, n)) for l, tok, n in zeroed]
        try:
            with torch.no_grad():
                logp = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, t - 1].double(), -1)
        finally:
            for h in hs:
                h.remove()
        return (logp[ids[0, t]] - logp[did]).item()

    want = [f(g) - f([]) for g in groups]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() > 1e-4


def test_answer_level_suppression_and_faithfulness(tiny_lm64):
    """Answer-level Δf matches L(c) − L(c') recomputed by hand; one tiny cell's Δf ≈ −A (linear regime)."""
    rendered, obj = answer_objective(tiny_lm64, CHAT, "9.8", "9.11", "The bigger number is ")
    trace = run_trace(tiny_lm64, CHAT, rendered=rendered, objective=obj)
    prompt = rendered.input_ids.tolist()
    masks = boundary_masks(tiny_lm64)
    a, b = obj.continuations
    cell = (1, len(prompt) - 2, 5)
    act = trace.activations[cell].item()

    def f(delta):
        return (_complete_logprob(tiny_lm64, prompt, a, masks.for_candidate("9.8"), cell, delta)
                - _complete_logprob(tiny_lm64, prompt, b, masks.for_candidate("9.11"), cell, delta))

    got = suppression_effects(tiny_lm64, trace, [[cell]])[0]
    assert got == pytest.approx(f(-act) - f(0.0), rel=1e-6, abs=1e-10)
    report = faithfulness(tiny_lm64, trace, k=8)
    assert len(report.rows) == 8
    for r in report.rows:
        assert r["predicted"] == pytest.approx(predicted_effect(trace, [_parse(r["group"])]))
    assert np.isfinite(report.spearman) and -1 <= report.spearman <= 1


def _parse(name: str):
    layer, rest = name.split("/N")
    neuron, tok = rest.split(" @ token ")
    return int(layer[1:]), int(tok), int(neuron)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"distractor": "id:99999999"}, "Unknown distractor token id"),
        ({"distractor": ""}, "distractor is empty"),
        ({"distractor": "SELF"}, "is the target token itself"),
        ({"distractor": " 8", "attribution": "prob"}, "single target"),
    ],
)
def test_bad_distractor_raises(tiny_lm, kwargs, needle):
    trace = run_trace(tiny_lm, CHAT, target_index=-4)
    if kwargs.get("distractor") == "SELF":
        kwargs = {"distractor": trace.tokens[-4]}
    with pytest.raises(MonitorError, match=needle):
        run_trace(tiny_lm, CHAT, target_index=-4, **kwargs)


@pytest.mark.parametrize("answer,versus,needle", [("9.8", "9.8", "the same"), ("  ", "9.11", "non-empty")])
def test_bad_answers_raise(tiny_lm, answer, versus, needle):
    with pytest.raises(MonitorError, match=needle):
        answer_objective(tiny_lm, CHAT, answer, versus, "The bigger number is ")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_contrastive_and_answer_json():
    res = _cli("trace", "--prompt", "Which is bigger: 9.8 or 9.11?", "--answer", "9.8", "--versus", "9.11",
               "--stem", "The bigger number is ", "--top", "5", "--faithfulness", "6", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["attribution"] == "answer" and out["objective"].startswith("L('9.8') − L('9.11')")
    assert np.isfinite(out["objective_value"]) and len(out["top_attributions"]) == 5
    assert len(out["faithfulness"]["rows"]) == 6
    res = _cli("trace", "--prompt", "Which is bigger: 9.8 or 9.11?", "--target-index", "-1", "--distractor", "8",
               "--top", "3", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["attribution"] == "contrast" and "− log p('8')" in out["objective"]


@pytest.mark.parametrize("args", [
    ("--target-index", "-1", "--distractor", "id:999999999"),  # after loading the model: the tokenizer decides
    ("--answer", "9.8"),  # before loading it
])
def test_cli_bad_objective_is_one_line_exit_2(args):
    res = _cli("trace", "--prompt", "Which is bigger: 9.8 or 9.11?", *args)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
