"""The ``experiment`` command line: steering experiments whose specs are resolved in the neuron database.

Run as ``python -m engine experiment decimals|custom …`` (``engine/__main__.py`` adds this
command to the engine's own) or ``python -m concepts experiment …``. Provides
:func:`register_cli` (the argparse sub-command) and :func:`cmd_experiment`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from engine.errors import MonitorError, at_least
from engine.experiments import analyze, build_conditions, run_experiment, to_markdown
from engine.prompt_sets import DECIMALS_PREFIX, DECIMALS_TEMPLATE, decimal_items, load_items, sample_items
from engine.scoring import DEFAULT_BATCH, DEFAULT_MAX_NEW_TOKENS
from engine.specs import ConceptSpec, specs_from_url

from .resolve import resolve


def register_cli(sub) -> None:
    """Add ``experiment`` to ``python -m engine``'s sub-commands."""
    ex = sub.add_parser("experiment", help="steering experiment with random controls and confidence intervals",
                        description="Score prompts under baseline, concept steering, their union and random "
                                    "controls; print a Markdown table (or JSON with --json).")
    ex.add_argument("which", choices=["decimals", "custom"], help="decimals: X.Y vs X.Z; custom: --file prompts.jsonl")
    ex.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id")
    ex.add_argument("--db", default=None, help="neuron database (default: data/<model>.duckdb)")
    ex.add_argument("--steer", action="append", default=[], metavar="SPEC",
                    help="'concept:mode:k[:key=value…]', e.g. 'Bible verses:suppress:500' (repeatable)")
    ex.add_argument("--steer-url", default=None, metavar="STRING", help="specs from a shared steering link (c1.…)")
    ex.add_argument("--controls", type=int, default=3, help="random controls matching the union per layer")
    ex.add_argument("--n", type=int, default=None, help="sample this many prompts (seeded); default all")
    ex.add_argument("--seed", type=int, default=0, help="seed for sampling, controls and bootstrap")
    ex.add_argument("--template", default=DECIMALS_TEMPLATE, help="decimals prompt with {a} and {b}")
    ex.add_argument("--larger", choices=["shorter", "longer"], default="shorter",
                    help="decimals: the larger number is the shorter one (9.8 vs 9.11, default) or the longer one "
                         "(9.2 vs 9.35: checks for a mere bias toward one-digit answers)")
    ex.add_argument("--prefix", default=None, help=f"assistant reply stem (decimals default {DECIMALS_PREFIX!r}, "
                                                    "custom default '')")
    ex.add_argument("--file", default=None, help="custom: JSON lines of {prompt, correct, wrong}")
    ex.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ex.add_argument("--no-greedy", action="store_true", help="forced choice only")
    ex.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ex.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores)")
    ex.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    ex.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown table to PATH")
    ex.add_argument("--per-item", action="store_true", help="include per-prompt results in the JSON")
    ex.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    from cache.db import open_database
    from cache.paths import db_path
    from engine.loader import load_model

    at_least(args.controls, 0, "--controls")
    at_least(args.max_new_tokens, 0, "--max-new-tokens")
    at_least(args.batch_size, 1, "--batch-size")
    if args.threads is not None:
        at_least(args.threads, 1, "--threads")
        import torch

        torch.set_num_threads(args.threads)
    specs = [ConceptSpec.parse(s) for s in args.steer]
    if args.steer_url:
        specs += specs_from_url(args.steer_url)
    if args.which == "decimals":
        if args.file:
            raise MonitorError("--file is for `experiment custom`; the decimals experiment builds its own prompts.")
        items = decimal_items(args.template, larger=args.larger)
        prefix = DECIMALS_PREFIX if args.prefix is None else args.prefix
    else:
        if not args.file:
            raise MonitorError("`experiment custom` needs --file prompts.jsonl "
                               "(one {\"prompt\": …, \"correct\": …, \"wrong\": …} per line).")
        items = load_items(args.file)
        prefix = "" if args.prefix is None else args.prefix
    items = sample_items(items, args.n, args.seed)
    db = db_label = None
    if specs:  # the database first: a missing one should fail before the model loads
        path = Path(args.db) if args.db else db_path(args.model)
        db = open_database(path, model=args.model)
        db_label = str(path)
    lm = load_model(args.model)
    selections, quantiles = [], None
    if db is not None:
        if (db.n_layers, db.n_neurons) != (lm.n_layers, lm.n_neurons):
            raise MonitorError(f"{path} describes a {db.n_layers}×{db.n_neurons} model but {lm.name} is "
                               f"{lm.n_layers}×{lm.n_neurons}: pass the database built for this model with --db.")
        resolved = resolve(db, specs)
        selections, quantiles = resolved.selections, resolved.quantiles
    conditions = build_conditions(selections, lm.n_neurons, args.controls, args.seed)
    import torch

    config = {"experiment": args.which, "model": lm.name, "db": db_label, "seed": args.seed,
              "threads": torch.get_num_threads(),
              "specs": [s.to_dict() for s in specs], "template": args.template if args.which == "decimals" else None,
              "larger": args.larger if args.which == "decimals" else None,
              "file": args.file, "controls": args.controls}
    bar = _progress_bar(len(items) * len(conditions))
    result = run_experiment(lm, items, conditions, quantiles, prefix, not args.no_greedy, args.max_new_tokens,
                            args.batch_size, config, progress=bar)
    bar.close()
    summary = analyze(result, seed=args.seed)
    if args.per_item:
        summary["items"] = [{"prompt": it.prompt, "correct": it.correct, "wrong": it.wrong} for it in items]
        for row, sc in zip(summary["conditions"], result.scores):
            row["per_item"] = {"forced_choice": sc.fc_correct.astype(int).tolist(),
                               "margin": [round(float(m), 4) for m in sc.margin],
                               "greedy": sc.greedy, "greedy_verdict": sc.greedy_verdict}
    table = to_markdown(summary)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, default=_jsonable))
    else:
        print(table)
    sys.stdout.flush()
    return 0


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x).__name__)


class _progress_bar:
    """tqdm on stderr, advanced per scored prompt; the description names the condition."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="prompt", dynamic_ncols=True, leave=False)
        self.last: dict[str, int] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        self.bar.set_description(name[:40])
        self.bar.update(done - self.last.get(name, 0))
        self.last[name] = done

    def close(self) -> None:
        self.bar.close()
