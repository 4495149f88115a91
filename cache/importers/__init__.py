"""Importers of the neuron databases other publishers released, into our DuckDB schema.

    python -m cache import transluce --dsn postgresql://clarity:sysadmin@localhost:5432/neurons
    python -m cache import neuronpedia exports/llama3.1-8b-it/  [--engine-model meta-llama/Llama-3.1-8B-Instruct]
    python -m cache import openai gpt2-xl-data/

One module per source (:mod:`.transluce`, :mod:`.neuronpedia`, :mod:`.openai`), each with
``add_arguments(parser)`` and ``run(args, out)``; :mod:`.job` holds what they share
(resumable batches, re-embedding, finishing). The output defaults to
``data/<model-slug>.duckdb`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from .job import EMBED_CHUNK

SOURCES = {
    "transluce": "Transluce's NeuronDB (Postgres), e.g. their Llama-3.1-8B-Instruct Docker image",
    "neuronpedia": "a Neuronpedia export folder (<modelId>/<source>/{features,explanations,activations})",
    "openai": "OpenAI's GPT-2 XL neuron records and explanations (automated-interpretability)",
}
DEFAULT_BATCH = {"transluce": 5000, "neuronpedia": 0, "openai": 256}


def module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def add_parsers(sub) -> None:
    """``import <source>`` subcommands on the ``python -m cache`` parser."""
    imp = sub.add_parser("import", help="import another publisher's neuron database")
    which = imp.add_subparsers(dest="source", required=True)
    for name, what in SOURCES.items():
        p = which.add_parser(name, help=what, description=f"Import {what} into a neuron database.")
        module(name).add_arguments(p)
        p.add_argument("--out", default=None, help="the .duckdb to write (default: data/<model-slug>.duckdb)")
        if DEFAULT_BATCH[name]:
            p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH[name],
                           help=f"rows (openai: neurons) per committed batch (default {DEFAULT_BATCH[name]})")
        p.add_argument("--embedder", default=None, help="local sentence-transformers folder for the summaries "
                                                        "(default: all-MiniLM-L6-v2)")
        p.add_argument("--embed-chunk", type=int, default=EMBED_CHUNK,
                       help=f"summaries embedded per committed chunk (default {EMBED_CHUNK})")
        p.add_argument("--fresh", action="store_true", help="discard an unfinished import of --out and start over")
        p.add_argument("--force", action="store_true", help="replace --out if it exists (when the import finishes)")


def run(args: argparse.Namespace) -> int:
    from engine.errors import at_least

    from ..paths import db_path

    if getattr(args, "batch_size", None) is not None:
        at_least(args.batch_size, 1, "--batch-size")
    at_least(args.embed_chunk, 1, "--embed-chunk")
    source = module(args.source)
    name = source.out_name(args) if hasattr(source, "out_name") else args.model
    out = Path(args.out) if args.out else db_path(name)
    path = source.run(args, out)
    print(f"imported into {path}")
    return 0
