"""Shared, session-scoped fixtures: the embedded model, a tiny random Llama, a Llama-3 tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The Llama-3 chat format, written from its published spec (header ids, <|eot_id|>).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def lm():
    from engine.loader import load_model

    return load_model("embedded")


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """The embedded tokenizer given Llama-3's special tokens and chat template."""
    from transformers import AutoTokenizer

    from engine.loader import ensure_embedded_model

    tok = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    tok.chat_template = LLAMA3_TEMPLATE
    path = tmp_path_factory.mktemp("llama3-tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama3_tokenizer):
    """A randomly initialised 3-layer Llama with the Llama-3 template, saved like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(llama3_tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=llama3_tokenizer.bos_token_id,
        eos_token_id=llama3_tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    llama3_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_llama_dir):
    from engine.loader import load_model

    return load_model(str(tiny_llama_dir))


def float64_copy(loaded, name: str):
    """A float64 copy of a loaded model, so finite differences are accurate.

    transformers' RMSNorm computes in float32 whatever the model dtype; with residuals in
    the thousands at the attention sink that rounding swamps an ε-perturbation, so the
    copy's norms are made to compute in float64 too (same formula: w · x / √(mean x² + eps)).
    """
    import copy

    import torch

    from engine.loader import LoadedModel

    model = copy.deepcopy(loaded.model).double()

    def rms64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = rms64.__get__(module)
    return LoadedModel(model, loaded.tokenizer, name, loaded.source)


@pytest.fixture(scope="session")
def lm64(lm):
    """The embedded model in float64 (:func:`float64_copy`)."""
    return float64_copy(lm, "embedded-fp64")


@pytest.fixture(scope="session")
def tiny_lm64(tiny_lm):
    return float64_copy(tiny_lm, "tiny-fp64")


# Layers the test database describes: a spread over the model, so layer filters have something to do.
TEST_DB_LAYERS = "0,8,15,22,29"


def build_db(model: str, root: Path, **overrides) -> Path:
    """Run the real precompute pipeline (tiny corpus) into ``root``; returns the database path."""
    from precompute.pipeline import Build, BuildConfig

    cfg = BuildConfig(model=model, profile="tiny", work_dir=str(root / "build"), db=str(root / "neurons.duckdb"), **overrides)
    return Build(cfg, progress=False).run()


@pytest.fixture(scope="session")
def embedded_db(tmp_path_factory) -> Path:
    """The embedded model's database from the tiny corpus, five layers described (≈3 min, once).

    ``MONITOR_TEST_DB_DIR`` (for development only) keeps it in that folder between test runs: the
    build resumes or skips its finished stages there, exactly as a user's build would."""
    keep = os.environ.get("MONITOR_TEST_DB_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("embedded-db")
    return build_db("embedded", root, layers=TEST_DB_LAYERS)


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny random Llama's full database (seconds)."""
    return build_db(str(tiny_llama_dir), tmp_path_factory.mktemp("tiny-db"), n_sequences=48, batch_size=8)


@pytest.fixture(scope="session")
def bigram_lm(tmp_path_factory):
    """A Llama whose next-token probabilities are set by hand (tests/bigram.py), loaded like any checkpoint."""
    from engine.loader import load_model

    from .bigram import build

    return load_model(str(build(tmp_path_factory.mktemp("bigram") / "model")))


# --------------------------------------------------------------------------- imported databases
@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 15 server in a temporary folder (tests/postgres_server.py)."""
    from tests.postgres_server import PostgresServer

    with PostgresServer() as pg:
        yield pg


def new_pg_database(pg, name: str) -> str:
    """Create database ``name`` on ``pg``; its DSN."""
    import psycopg

    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def tiny_transluce(pg_server, tiny_llama_dir, tmp_path_factory):
    """A Transluce NeuronDB of the tiny Llama (3 layers × 96 neurons, with every quirk), imported.

    Returns (database path, the source rows by table, the model id)."""
    import psycopg

    from cache.__main__ import main
    from tests.postgres_server import create_transluce_tables, fill_transluce

    model = str(tiny_llama_dir)
    dsn = new_pg_database(pg_server, "tiny")
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_transluce_tables(conn)
        rows = fill_transluce(conn, model, 3, 96, exemplars=3, dim=16)
    out = tmp_path_factory.mktemp("tiny-transluce") / "tiny-llama.duckdb"
    assert main(["import", "transluce", "--dsn", dsn, "--model", model, "--out", str(out)]) == 0
    return out, rows, model
