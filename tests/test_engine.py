"""Engine correctness against independent computations (hand-written MLP, finite differences)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.chat import render_chat
from engine.errors import MonitorError
from engine.generate import generate, generate_pair, sequence_logprob
from engine.hooks import NeuronHooks
from engine.loader import load_model
from engine.steering import Intervention, TokenRange, compile_interventions
from engine.trace import run_trace

from .conftest import ROOT

CHAT = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]
MULTI = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And Genesis 1:3?"},
]


def _mlp_inputs(lm, ids):
    """Each layer's post-attention-norm output (the MLP input) and its MLP output."""
    norm_out, mlp_out, handles = {}, {}, []
    for i, layer in enumerate(lm.layers):
        handles.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: norm_out.__setitem__(i, o.detach())))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: mlp_out.__setitem__(i, o.detach())))
    return norm_out, mlp_out, handles


@pytest.mark.parametrize("which", ["lm", "tiny_lm"])
def test_activation_matches_hand_computed_mlp(which, request):
    model = request.getfixturevalue(which)
    rendered = render_chat(model.tokenizer, CHAT)
    norm_out, _, handles = _mlp_inputs(model, rendered.input_ids)
    try:
        trace = run_trace(model, CHAT)
    finally:
        for h in handles:
            h.remove()
    assert trace.activations.shape == (model.n_layers, len(rendered), model.n_neurons)
    for layer in range(model.n_layers):
        mlp = model.layers[layer].mlp
        h = norm_out[layer][0]
        by_hand = F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)  # [tokens, neurons]
        torch.testing.assert_close(trace.activations[layer], by_hand.float(), rtol=1e-4, atol=1e-4)


def _target_logp(lm, ids, target, layer, token, neuron, delta):
    """log p(x_target) with delta added to one neuron's activation (the perturbed function)."""

    def hook(module, args):
        x = args[0].clone()
        x[0, token, neuron] += delta
        return (x,)

    h = lm.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0]
    finally:
        h.remove()
    return torch.log_softmax(logits[target - 1], -1)[ids[0, target]].item()


@pytest.mark.parametrize("kind", ["logprob", "prob"])
def test_attribution_matches_central_finite_difference(lm64, kind):
    """A = a · ∂f/∂a with f = log p (or p); checked against (f(a+ε) − f(a−ε)) / 2ε in float64.

    Tolerance: relative 1e-4 (plus 1e-9 absolute) — float64 central differences with
    ε = 1e-4 have error O(ε²) far below that. A gradient through detached leaves (a hook
    that swaps each layer's neurons for a fresh leaf cuts every path through later MLPs) is
    off by large factors on early layers and fails this.
    """
    trace = run_trace(lm64, CHAT, target_index=-4, attribution=kind)
    target = trace.target_index
    ids = trace.rendered.input_ids[None]
    top = trace.top_attributions(3)
    cells = [(r["layer"], r["token_index"], r["neuron"]) for r in top]
    cells += [(0, target - 2, 17), (5, target - 1, 900), (12, 26, 1234)]  # early layers: paths through later MLPs
    eps = 1e-4
    for layer, token, neuron in cells:
        plus = _target_logp(lm64, ids, target, layer, token, neuron, eps)
        minus = _target_logp(lm64, ids, target, layer, token, neuron, -eps)
        if kind == "prob":
            plus, minus = np.exp(plus), np.exp(minus)
        fd = trace.activations[layer, token, neuron].item() * (plus - minus) / (2 * eps)
        got = trace.attributions[layer, token, neuron].item()
        assert got == pytest.approx(fd, rel=1e-4, abs=1e-9), (layer, token, neuron)


def test_attribution_nonzero_beyond_target_is_zero(lm):
    """Tokens after the target cannot influence it (causal mask): their attribution is exactly 0."""
    trace = run_trace(lm, CHAT, target_index=30)
    assert trace.attributions[:, 31:].abs().max().item() == 0.0
    assert trace.attributions[:, :30].abs().max().item() > 0.0


def _logits(lm, ids, compiled=None):
    with torch.no_grad(), NeuronHooks(lm, interventions=compiled):
        return lm.model(input_ids=ids[None]).logits


def test_scale_one_is_bitwise_identity(lm):
    rendered = render_chat(lm.tokenizer, CHAT)
    neurons = [(layer, n, 1) for layer in range(0, lm.n_layers, 3) for n in range(0, lm.n_neurons, 7)]
    compiled = compile_interventions(
        [Intervention(neurons, mode="scale", factor=1.0, tokens=TokenRange("prompt"))], rendered, lm.n_layers, lm.n_neurons
    )
    assert compiled
    assert torch.equal(_logits(lm, rendered.input_ids), _logits(lm, rendered.input_ids, compiled))


def test_scale_zero_changes_mlp_output_by_minus_a_times_column(lm):
    rendered = render_chat(lm.tokenizer, CHAT)
    layer, neuron, token = 7, 321, 30
    _, out0, handles = _mlp_inputs(lm, rendered.input_ids)
    acts = run_trace(lm, CHAT).activations
    for h in handles:
        h.remove()
    compiled = compile_interventions(
        [Intervention([(layer, neuron, 1)], mode="scale", factor=0.0, tokens=TokenRange("positions", (token,)))],
        rendered, lm.n_layers, lm.n_neurons,
    )
    captured = {}
    h = lm.layers[layer].mlp.register_forward_hook(lambda m, a, o: captured.__setitem__("out", o.detach()))
    try:
        _logits(lm, rendered.input_ids, compiled)
    finally:
        h.remove()
    diff = captured["out"][0] - out0[layer][0]  # [tokens, hidden]
    expected = -acts[layer, token, neuron] * lm.layers[layer].mlp.down_proj.weight[:, neuron]
    torch.testing.assert_close(diff[token], expected, rtol=1e-4, atol=1e-5)
    others = torch.cat([diff[:token], diff[token + 1 :]])
    assert others.abs().max().item() == 0.0  # layer input unchanged before the token; positions ≠ token untouched here


def test_replace_sets_claimed_value_on_chosen_tokens_only(lm):
    rendered = render_chat(lm.tokenizer, MULTI)
    q = {1: np.full((lm.n_layers, lm.n_neurons), 4.0, dtype=np.float32), -1: np.full((lm.n_layers, lm.n_neurons), -3.0, dtype=np.float32)}
    q[1][3, 10] = 12.5
    iv = [
        Intervention([(3, 10, 1)], mode="replace", strength=0.75),
        Intervention([(4, 20, -1)], mode="replace", strength=2.0, tokens=TokenRange("positions", (5, 6))),
    ]
    base = run_trace(lm, MULTI).activations
    trace = run_trace(lm, MULTI, interventions=iv, quantiles=q)
    start, end = rendered.last_turn("user")
    assert end - start > 3 and torch.all(trace.activations[3, start:end, 10] == 0.75 * 12.5)
    assert torch.all(trace.activations[4, [5, 6], 20] == -6.0)
    # Before layer 3 nothing changes; untouched positions of layer 3 before the turn are unchanged.
    assert torch.equal(trace.activations[:3], base[:3])
    assert torch.equal(trace.activations[3, :start, 10], base[3, :start, 10])


def test_chat_round_trip_and_last_user_turn_smollm2(lm):
    rendered = render_chat(lm.tokenizer, MULTI)
    assert lm.tokenizer.decode(rendered.input_ids) == rendered.text
    assert "".join(rendered.tokens) == rendered.text
    for msg, (a, b) in zip(MULTI, rendered.message_spans):
        assert lm.tokenizer.decode(rendered.input_ids[a:b]).strip() == msg["content"]
    a, b = rendered.last_turn("user")
    assert lm.tokenizer.decode(rendered.input_ids[a:b]) == "And Genesis 1:3?"
    assert rendered.text.endswith("<|im_start|>assistant\n")


def test_chat_round_trip_and_last_user_turn_llama3(llama3_tokenizer):
    rendered = render_chat(llama3_tokenizer, MULTI)
    assert rendered.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert rendered.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3_tokenizer.decode(rendered.input_ids) == rendered.text
    ids = rendered.input_ids.tolist()
    assert ids.count(llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")) == 4
    a, b = rendered.last_turn("user")
    assert llama3_tokenizer.decode(rendered.input_ids[a:b]) == "And Genesis 1:3?"
    assert llama3_tokenizer.convert_ids_to_tokens(ids[b]) == "<|eot_id|>"


def test_generic_llama_checkpoint_path(tiny_lm):
    assert tiny_lm.n_layers == 3 and tiny_lm.n_neurons == 96
    trace = run_trace(tiny_lm, CHAT, target_index=-1)
    assert trace.attributions.shape == trace.activations.shape
    assert len(trace.top_next[0]) == 5


def test_greedy_pair_and_seeded_sampling(lm):
    base, steered = generate_pair(
        lm, CHAT, [Intervention([(l, n, 1) for l in range(10, 20) for n in range(0, 1536, 2)], mode="scale", factor=0.0,
                                tokens=TokenRange("prompt", generated=True))],
        max_new_tokens=8,
    )
    again = generate(lm, CHAT, max_new_tokens=8)
    assert base.token_ids == again.token_ids and not base.steered and steered.steered
    assert base.token_ids != steered.token_ids
    s1 = generate(lm, CHAT, max_new_tokens=12, temperature=1.0, seed=7)
    s2 = generate(lm, CHAT, max_new_tokens=12, temperature=1.0, seed=7)
    assert s1.token_ids == s2.token_ids


def test_generation_steering_matches_full_forward(lm):
    """Steering with a KV cache equals steering the whole sequence at once (position bookkeeping)."""
    iv = [Intervention([(l, n, 1) for l in (2, 8, 15) for n in range(0, 1536, 3)], mode="scale", factor=0.0,
                       tokens=TokenRange("last_user", generated=True))]
    gen = generate(lm, CHAT, max_new_tokens=6, interventions=iv)
    rendered = render_chat(lm.tokenizer, CHAT)
    full = torch.cat([rendered.input_ids, torch.tensor(gen.token_ids[:-1])])
    start, end = rendered.last_turn("user")
    positions = tuple(range(start, end)) + tuple(range(len(rendered), len(full)))
    full_rendered = render_chat(lm.tokenizer, lm.tokenizer.decode(full), add_generation_prompt=False)
    assert full_rendered.input_ids.tolist()[: len(full)] == full.tolist()
    compiled = compile_interventions([Intervention(iv[0].neurons, "scale", factor=0.0, tokens=TokenRange("positions", positions))],
                                     full_rendered, lm.n_layers, lm.n_neurons)
    logits = _logits(lm, full_rendered.input_ids, compiled)[0]
    predicted = logits[len(rendered) - 1 :].argmax(-1).tolist()
    assert predicted == gen.token_ids


def test_sequence_logprob_equals_sum_of_token_logprobs(lm):
    lp = sequence_logprob(lm, CHAT, "9.8", prefix="The bigger number is ")
    rendered = render_chat(lm.tokenizer, CHAT)
    pre = lm.tokenizer("The bigger number is ", add_special_tokens=False)["input_ids"]
    full = lm.tokenizer("The bigger number is 9.8", add_special_tokens=False)["input_ids"]
    ids = rendered.input_ids.tolist() + full
    total = 0.0
    with torch.no_grad():
        for i in range(len(rendered) + len(pre), len(ids)):  # one forward per token: independent of the batched gather
            logits = lm.model(input_ids=torch.tensor([ids[:i]])).logits[0, -1]
            total += torch.log_softmax(logits, -1)[ids[i]].item()
    assert lp == pytest.approx(total, abs=1e-3)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda lm: run_trace(lm, ""), "empty"),
        (lambda lm: run_trace(lm, [{"role": "user", "content": "   "}]), "empty"),
        (lambda lm: run_trace(lm, CHAT, target_index=999), "out of range"),
        (lambda lm: run_trace(lm, CHAT, target_index=0), "out of range"),
        (lambda lm: run_trace(lm, CHAT, interventions=[Intervention([(0, 99999, 1)], "scale")]), "Neuron 99999 is out of range"),
        (lambda lm: run_trace(lm, CHAT, interventions=[Intervention([(40, 1, 1)], "scale")]), "Layer 40 is out of range"),
        (lambda lm: run_trace(lm, CHAT, interventions=[Intervention([(1, 1, 1)], "scale", factor=0.0),
                                                        Intervention([(1, 1, 1)], "scale", factor=2.0)]), "Contradictory"),
        (lambda lm: run_trace(lm, CHAT, interventions=[Intervention([(1, 1, 1)], "replace", strength=0.75)]), "quantiles"),
        (lambda lm: run_trace(lm, CHAT, interventions=[Intervention([(1, 1, 1)], "scale", tokens=TokenRange("positions", (500,)))]), "out of range"),
        (lambda lm: lm.check_neuron(0, 1536), "out of range"),
    ],
)
def test_bad_input_raises_monitor_error(lm, call, needle):
    with pytest.raises(MonitorError, match=needle):
        call(lm)


def test_disjoint_ranges_on_one_neuron_are_not_contradictory(lm):
    iv = [Intervention([(1, 1, 1)], "scale", factor=0.0, tokens=TokenRange("positions", (3,))),
          Intervention([(1, 1, 1)], "scale", factor=2.0, tokens=TokenRange("positions", (4,))),
          Intervention([(1, 1, 1)], "scale", factor=2.0, tokens=TokenRange("positions", (4, 5)))]  # duplicate on 4: applied once
    base = run_trace(lm, CHAT).activations
    got = run_trace(lm, CHAT, interventions=iv).activations
    assert got[1, 3, 1] == 0 and got[1, 4, 1] == 2 * base[1, 4, 1] and got[1, 5, 1] == 2 * base[1, 5, 1]


def test_prompt_longer_than_context(tiny_lm):
    with pytest.raises(MonitorError, match="longer than the model's context"):
        run_trace(tiny_lm, "word " * 300)


def test_unknown_model_message():
    with pytest.raises(MonitorError, match="Hub downloads need network") as err:
        load_model("no-such-org/no-such-model")
    assert "local folder" in str(err.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_trace_json():
    res = _cli("trace", "--model", "embedded", "--prompt", "Which is bigger: 9.8 or 9.11?", "--target-index", "-1", "--top", "7", "--generate", "4", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"][24:27] == ["Which", " is", " bigger"]
    for key in ("top_activations", "top_attributions"):
        vals = [abs(r["value"]) for r in out[key]]
        assert len(vals) == 7 and vals == sorted(vals, reverse=True)
        assert set(out[key][0]) == {"layer", "neuron", "token_index", "value"}
    assert isinstance(out["generated"], str) and out["generated"]


@pytest.mark.parametrize(
    "args",
    [
        ("trace", "--prompt", ""),
        ("trace", "--prompt", "hi", "--model", "/does/not/exist"),
        ("trace", "--prompt", "hi", "--target-index", "500"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args):
    res = _cli(*args)
    assert res.returncode == 2
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr


def test_engine_imports_no_database_dashboard_or_precompute_code():
    """The layering: engine/ knows no database (cache/, concepts/), no Streamlit, no precompute.

    Checked twice: statically (every import statement of every engine module but the
    ``__main__`` entry point) and dynamically (importing all of them pulls none in)."""
    import ast

    forbidden = ("cache", "concepts", "dashboard", "precompute", "streamlit")
    names = []
    for path in sorted((ROOT / "engine").glob("*.py")):
        if path.name == "__main__.py":
            continue
        names.append(f"engine.{path.stem}" if path.stem != "__init__" else "engine")
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for m in mods:
                assert m.split(".")[0] not in forbidden, f"{path.name} imports {m}"
    code = ("import sys, importlib\n"
            f"for m in {names!r}: importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
