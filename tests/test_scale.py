"""Scale rehearsal: the synthetic Llama with Llama-3.1-8B's neuron count (engine/synth.py).

* the synthetic model loads through the normal loader, and a trace's activations at one layer
  equal ``act_fn(gate(x)) * up(x)`` computed by hand from the weights, with ``x`` the layer's
  post-attention-layernormed input captured by an independent forward hook (fast);
* (slow) a small-corpus build at the full 458,752 neurons (one layer described) gives a database
  that passes the precompute tests' checks (one score row per key and scorer, the main score is
  its row, no stored zero) and the database's own validation (:func:`cache.db.open_database`).
"""

from __future__ import annotations

import duckdb
import pytest
import torch

from engine.errors import MonitorError

from .conftest import build_db
from .test_precompute import assert_one_score_row_per_key


@pytest.fixture(scope="module")
def synth_8b_dir(tmp_path_factory):
    """The llama-3.1-8b-neurons synthetic model (32 × 14,336, hidden 256), written once (~20 s)."""
    from engine.synth import write_model

    return write_model("llama-3.1-8b-neurons", tmp_path_factory.mktemp("synth") / "llama-3.1-8b-neurons")


@pytest.fixture(scope="module")
def synth_8b(synth_8b_dir):
    from engine.loader import load_model

    return load_model(str(synth_8b_dir))


def test_synthetic_model_loads_like_a_checkpoint(synth_8b, synth_8b_dir):
    lm = synth_8b
    assert (lm.n_layers, lm.n_neurons) == (32, 14336)
    assert lm.config.hidden_size == 256 and lm.config.num_attention_heads == 4 and lm.config.num_key_value_heads == 2
    assert lm.config.vocab_size == len(lm.tokenizer)  # the embedded model's tokenizer
    assert lm.tokenizer.chat_template  # saved with the folder: chat traces work
    assert (synth_8b_dir / "model.safetensors").exists() or list(synth_8b_dir.glob("model-*.safetensors"))


def test_trace_activations_match_a_hand_computed_mlp(synth_8b):
    from engine.synth import check_activations
    from engine.trace import run_trace

    lm, layer = synth_8b, 17
    chat = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]
    captured = {}
    mlp = lm.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0].detach().clone()))
    try:
        trace = run_trace(lm, chat)
    finally:
        handle.remove()
    x = captured["x"][0].double()  # [tokens, hidden]: the post-attention-layernormed input of the MLP
    gate = x @ mlp.gate_proj.weight.double().T
    up = x @ mlp.up_proj.weight.double().T
    want = torch.nn.functional.silu(gate) * up  # act_fn is SiLU for Llama
    assert trace.compact is not None and trace.activations is None  # this width keeps the compact store
    got = trace.layer("activations", layer).double()  # recomputed on demand from the chat
    assert got.shape == want.shape == (len(trace.tokens), 14336)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    stats = check_activations(lm)  # non-degenerate: finite and varied
    assert stats["finite"] and stats["std"] > 1e-3 and stats["zero_fraction"] < 0.01


def test_unknown_shape_and_bad_hidden_are_one_line_errors(tmp_path):
    from engine.synth import write_model

    with pytest.raises(MonitorError, match="Unknown shape"):
        write_model("llama-9000", tmp_path / "x")
    with pytest.raises(MonitorError, match="--hidden"):
        write_model("embedded-neurons", tmp_path / "y", hidden=100)


@pytest.mark.slow
def test_full_neuron_count_build_passes_the_database_checks(synth_8b_dir, tmp_path_factory):
    """24 windows of 16 tokens at 458,752 neurons: the activation pass, exemplars, quantiles and
    the database cover every neuron; one layer is described, scored and embedded (describing all
    917,504 polarities is minutes of CPU per 100k, too long for a test: see the README's Scale)."""
    from cache.db import open_database

    path = build_db(str(synth_8b_dir), tmp_path_factory.mktemp("synth-db"), n_sequences=24, seq_len=16,
                    batch_size=8, n_random=8, layers="31")
    with open_database(path) as db:
        counts = db.counts()
        assert (int(db.meta["n_layers"]), int(db.meta["n_neurons"])) == (32, 14336)
        assert db.meta["described_layers"] == "[31]"
    con = duckdb.connect(str(path), read_only=True)
    try:
        n_neurons = con.execute("SELECT count(*) FROM neurons").fetchone()[0]
        n_desc = con.execute("SELECT count(*) FROM descriptions").fetchone()[0]
        n_quant = con.execute("SELECT count(DISTINCT (layer, neuron)) FROM quantiles").fetchone()[0]
        n_exemplar_neurons = con.execute("SELECT count(DISTINCT (layer, neuron)) FROM exemplars").fetchone()[0]
    finally:
        con.close()
    assert n_quant == n_exemplar_neurons == 458_752
    assert n_desc == counts["embeddings"] == n_neurons * 2 == 2 * 14_336
    assert_one_score_row_per_key(path)
