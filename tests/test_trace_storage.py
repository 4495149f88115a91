"""Per-session trace memory: the compact storage (engine.trace) shows what the whole trace shows.

The embedded model's traces are small, so they stay whole (dense); ``MONITOR_TRACE_DENSE_MB=0``
forces the compact storage on the same chat, and every ranking, row and effect the pages and the
linter read must come out the same. A 32-layer × 14,336-neuron model (Llama-3.1-8B's neuron
count, random weights) checks the memory: a ~200-token chat with attribution held in ≤ 200 MB,
its values equal to an independent recomputation.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dashboard import ranking
from engine.activation_view import ActivationView
from engine.steering import Intervention
from engine.trace import run_trace

CHAT = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11? Then name the moon landing's year."}]
MB = 2**20


@contextlib.contextmanager
def dense_mb(value: str | None):
    old = os.environ.get("MONITOR_TRACE_DENSE_MB")
    if value is None:
        os.environ.pop("MONITOR_TRACE_DENSE_MB", None)
    else:
        os.environ["MONITOR_TRACE_DENSE_MB"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MONITOR_TRACE_DENSE_MB", None)
        else:
            os.environ["MONITOR_TRACE_DENSE_MB"] = old


def both(lm, **kw):
    """(dense, compact) traces of CHAT with the same arguments."""
    with dense_mb(None):
        dense = run_trace(lm, CHAT, **kw)
    with dense_mb("0"):
        compact = run_trace(lm, CHAT, **kw)
    assert not dense.is_compact and compact.is_compact
    assert compact.activations is None and compact.attributions is None
    return dense, compact


@pytest.fixture(scope="module")
def attributed(lm):
    return both(lm, target_index=-1)


@pytest.fixture(scope="module")
def view(lm):
    """A view with some tiny (floored) and some missing (infinite) divisors, as a database gives."""
    g = np.random.default_rng(0)
    q_hi = (np.abs(g.normal(size=(lm.n_layers, lm.n_neurons))) * 5).astype(np.float32)
    q_lo = (-np.abs(g.normal(size=q_hi.shape)) * 5).astype(np.float32)
    q_hi[3, :40], q_lo[3, 40:80], q_hi[5, :10], q_lo[5, :10] = 1e-9, -1e-9, np.nan, np.nan
    return ActivationView.from_quantiles(q_hi, q_lo)


def same_frame(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), rtol=1e-5, atol=1e-7)


def test_the_embedded_model_stays_dense_and_the_compact_trace_is_small(attributed):
    dense, compact = attributed
    assert dense.nbytes() == 2 * dense.activations.numel() * 4
    assert compact.shape == dense.shape
    assert compact.nbytes() < dense.nbytes() / 5


def test_chat_page_activation_rows_and_heatmap_agree(attributed, view):
    dense, compact = attributed
    for v, thresholds in ((view, (1.0, 0.5, 0.0)), (None, (5.0, 1.0))):
        for threshold in thresholds:
            for skip_sink in (True, False):
                rd, td = ranking.activation_rows(dense, v, threshold, skip_sink)
                rc, tc = ranking.activation_rows(compact, v, threshold, skip_sink)
                assert td == tc
                same_frame(rd, rc)
    same_frame(ranking.activation_heatmap(dense, view, 1.0), ranking.activation_heatmap(compact, view, 1.0))


def test_chat_page_attribution_rows_heatmap_and_top_cells_agree(attributed, view):
    dense, compact = attributed
    for kind in ("logprob", "prob"):
        for skip_sink in (True, False):
            rd, rc = (ranking.attribution_rows(t, kind, 1000, skip_sink) for t in (dense, compact))
            same_frame(rd, rc)
            same_frame(ranking.attribution_heatmap(dense, kind, rd, skip_sink),
                       ranking.attribution_heatmap(compact, kind, rc, skip_sink))
    assert dense.top_attributions(50) == compact.top_attributions(50)
    for skip in ((0,), ()):
        assert dense.top_activations(30, skip) == compact.top_activations(30, skip)
    # under a view, and skipping other tokens too, the compact trace ranks layer by layer
    assert dense.top_activations(30, (0, 1, 2), view) == compact.top_activations(30, (0, 1, 2), view)
    assert dense.top_cells("attributions", 2000, (0,)) == compact.top_cells("attributions", 2000, (0,))


def test_rows_cells_and_layers_agree_and_the_layer_cache_stays_small(attributed):
    dense, compact = attributed
    L, T, N = dense.shape
    for layer, neuron in ((0, 5), (L - 1, N - 1), (L - 1, 7)):  # one layer recomputed (early stop), one cached
        torch.testing.assert_close(compact.neuron_row("activations", layer, neuron),
                                   dense.neuron_row("activations", layer, neuron), rtol=1e-5, atol=1e-7)
    assert 0 < compact.nbytes() - compact.compact.nbytes() <= 16 * MB  # the cached layers
    pairs = [(0, 5), (L // 2, 100), (L - 1, N - 1)]
    got, want = compact.neuron_rows("attributions", pairs), dense.neuron_rows("attributions", pairs)
    for p in pairs:
        torch.testing.assert_close(got[p], want[p], rtol=1e-5, atol=1e-7)
    g = np.random.default_rng(1)
    cells = [g.integers(0, s, 200) for s in (L, T, N)]  # mostly cells the store does not hold: recomputed
    np.testing.assert_allclose(compact.cells("activations", *cells), dense.cells("activations", *cells),
                               rtol=1e-5, atol=1e-7)
    top = dense.top_attributions(20)  # cells the store holds: no recomputation
    cells = [np.array([c[f] for c in top] + [0]) for f in ("layer", "token_index", "neuron")]
    np.testing.assert_allclose(compact.cells("attributions", *cells), dense.cells("attributions", *cells), rtol=1e-6)


def test_linter_and_effects_agree(attributed, view):
    from engine.effects import predicted_effect
    from engine.linter import important_neurons

    dense, compact = attributed
    for mode, kw in (("attribution", {}), ("activation", {"scale": view}), ("activation", {"scale": view,
                                                                                            "min_normalised": 0.5})):
        hd, hc = (important_neurons(t, mode, k=300, **kw) for t in (dense, compact))
        assert [(h.key, round(h.weight, 6), sorted(h.tokens)) for h in hd] == \
               [(h.key, round(h.weight, 6), sorted(h.tokens)) for h in hc] and hd
    cells = [(c["layer"], c["token_index"], c["neuron"]) for c in dense.top_attributions(10)] + [(2, 3, 4), (9, 1, 7)]
    assert predicted_effect(compact, cells) == pytest.approx(predicted_effect(dense, cells), rel=1e-6)
    # faithfulness suppresses these cells (the measured side reads only the rendered chat and objective)
    assert dense.top_cells("attributions", 20, (0,)) == compact.top_cells("attributions", 20, (0,))


def test_a_steered_trace_without_attribution_recomputes_with_its_interventions(lm):
    iv = [Intervention([(4, 20, 1)], "replace", strength=0.0), Intervention([(10, 7, 1)], "scale", factor=3.0)]
    dense, compact = both(lm, interventions=iv)
    assert not compact.has_attribution
    pairs = [(4, 20), (10, 7), (10, 8), (20, 3)]
    got, want = compact.neuron_rows("activations", pairs), dense.neuron_rows("activations", pairs)
    for p in pairs:
        torch.testing.assert_close(got[p], want[p], rtol=1e-5, atol=1e-7)
    same_frame(ranking.activation_rows(dense, None, 2.0)[0], ranking.activation_rows(compact, None, 2.0)[0])


# --------------------------------------------------------------------------- 8B's neuron count
@pytest.fixture(scope="module")
def wide_lm():
    """32 layers × 14,336 neurons (Llama-3.1-8B's MLP width), hidden size 64, random weights, the
    embedded tokenizer; wrapped as :func:`engine.loader.load_model` returns a model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.loader import LoadedModel, ensure_embedded_model

    tok = AutoTokenizer.from_pretrained(ensure_embedded_model(progress=False))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return LoadedModel(model, tok, "random-32x14336", "test")


def _independent(lm, ids: torch.Tensor, target: int, layers: list[int]):
    """Activations of ``layers`` and ``a · ∂log p(target)/∂a`` of the last one, with the test's own hooks
    and autograd."""
    captured = {}

    def make(layer):
        def hook(module, args):
            x = args[0]
            if layer == 0:  # the graph's leaf
                x = x.detach().requires_grad_(True)
            captured[layer] = x
            return (x,) + tuple(args[1:])
        return hook

    handles = [lm.layers[l].mlp.down_proj.register_forward_pre_hook(make(l)) for l in range(lm.n_layers)]
    try:
        with torch.enable_grad():
            logits = lm.model(input_ids=ids[None]).logits[0]
            f = torch.log_softmax(logits[target - 1].float(), dim=-1)[ids[target]]
            grads = torch.autograd.grad(f, [captured[layers[-1]]])
    finally:
        for h in handles:
            h.remove()
    return ({l: captured[l][0].detach() for l in layers}, (captured[layers[-1]][0] * grads[0][0]).detach())


def test_a_200_token_chat_at_8b_neuron_count_holds_under_200_mb(wide_lm):
    import time

    words = "The quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence " * 10
    chat = [{"role": "user", "content": words}]
    t0 = time.perf_counter()
    trace = run_trace(wide_lm, chat, target_index=-1)  # the default budget: this shape is compact
    seconds = time.perf_counter() - t0
    L, T, N = trace.shape
    assert (L, N) == (32, 14336) and 190 <= T <= 230 and trace.is_compact
    dense_bytes = 2 * L * T * N * 4
    held = trace.nbytes()
    print(f"\n{T} tokens: dense would hold {dense_bytes / MB:.0f} MB; compact holds {held / MB:.1f} MB "
          f"(trace + attribution {seconds:.1f} s)")
    assert held <= 200 * MB
    ids = trace.rendered.input_ids
    acts_by_layer, attr = _independent(wide_lm, ids, T - 1, [0, L - 1])
    c = trace.compact
    for l, acts in acts_by_layer.items():  # what the store holds of the activations, exactly
        torch.testing.assert_close(c.act_sink[l], acts[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.pos_val[l], acts[1:].clamp(min=0).max(dim=0).values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.neg_val[l], acts[1:].clamp(max=0).min(dim=0).values, rtol=1e-5, atol=1e-6)
        flat = acts.reshape(-1)
        torch.testing.assert_close(c.act_top_val[l], flat[c.act_top_idx[l].long()], rtol=1e-5, atol=1e-6)
    l, scale = L - 1, float(attr.abs().max())  # … and of the attributions
    torch.testing.assert_close(c.attr_abs_sum[l], attr.abs().sum(-1), rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(c.attr_top_val[l], attr.reshape(-1)[c.attr_top_idx[l].long()], rtol=1e-4,
                               atol=1e-5 * scale)
    kth = torch.topk(attr[1:].abs().reshape(-1), c.attr_top_idx.shape[1]).values[-1]
    assert float(c.attr_top_val[l].abs().min()) >= float(kth) * (1 - 1e-4)
    # what it recomputes on demand (the forward stops after layer 0), and the cache stays within budget
    torch.testing.assert_close(trace.layer("activations", 0), acts_by_layer[0], rtol=1e-5, atol=1e-6)
    assert trace.nbytes() <= 200 * MB
    rows = ranking.attribution_rows(trace, "logprob", 1000)
    assert len(rows) == 1000 and rows["value"].abs().is_monotonic_decreasing
    # the chat page's session holds this chat's plain trace too (its activation rows, a neuron's strip)
    fwd = run_trace(wide_lm, chat)
    torch.testing.assert_close(fwd.neuron_row("activations", 0, 9), acts_by_layer[0][:, 9], rtol=1e-5, atol=1e-6)
    session = fwd.nbytes() + trace.nbytes()
    print(f"session: plain trace {fwd.nbytes() / MB:.1f} MB + attribution trace {trace.nbytes() / MB:.1f} MB "
          f"= {session / MB:.1f} MB")
    assert session <= 200 * MB
