"""The ``experiment`` command line: steering experiments whose specs are resolved in the neuron database.

Run as ``python -m engine experiment decimals|custom|replicate …`` (``engine/__main__.py`` adds this
command to the engine's own) or ``python -m concepts experiment …``. Provides :func:`register_cli`
(the argparse sub-command) and :func:`cmd_experiment`.

* ``decimals``: a generated "which is bigger" set (``--set``, ``--format``, ``--x-range``,
  ``--pairs``; the old ``--template`` and ``--larger`` still work);
* ``custom``: ``--file prompts.jsonl``;
* ``replicate``: the whole replication suite (:mod:`engine.replication`): formats × sets ×
  concepts (× doses), one Markdown + JSON report with charts (and ``--html``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


from engine.errors import MonitorError, at_least
from engine.experiments import DEFAULT_CONTROLS, analyze, build_conditions, run_experiment, to_json, to_markdown
from engine.prompt_sets import (DEFAULT_FORMATS, DEFAULT_SETS, DEFAULT_X_RANGE, FORMATS, SETS,
                                Format, decimal_pairs, format_items, load_items, sample_items)
from engine.scoring import DEFAULT_BATCH, DEFAULT_MAX_NEW_TOKENS
from engine.specs import ConceptSpec, specs_from_url

from .resolve import activation_view, resolve

DEFAULT_CONCEPTS = ("Bible verses:suppress:500", "dates:suppress:500")
DEFAULT_CONCEPT_CONTROLS = ("decimal numbers:suppress:500",)


def register_cli(sub) -> None:
    """Add ``experiment`` and ``lint`` to a command line's sub-commands."""
    from engine.cli import add_objective_args

    li = sub.add_parser("lint", help="the concept linter on one prompt, each cluster checked causally",
                        description="Cluster the neurons that matter for the chosen objective (a target token, "
                                    "a contrast, or an answer pair) by their descriptions, flag the ones unrelated "
                                    "to the conversation, and measure what suppressing each cluster does against "
                                    "random neuron sets matched in size, layers and activation mass.")
    add_objective_args(li)
    li.add_argument("--db", default=None, help="neuron database (default: data/<model>.duckdb)")
    li.add_argument("--k", type=int, default=None, help="important neurons: the top K attribution cells (default 1000)")
    li.add_argument("--null", type=int, default=None, help="random matched sets per cluster (default 20, at least 20)")
    li.add_argument("--seed", type=int, default=0)
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_lint)
    ex = sub.add_parser("experiment", help="steering experiments with a null of random controls",
                        description="Score prompts under the baseline, concept steering, concept controls and "
                                    "random controls matched on layers and activation mass; print a Markdown table "
                                    "(or JSON with --json). `replicate` runs the whole suite and writes a report.")
    ex.add_argument("which", choices=["decimals", "custom", "replicate"],
                    help="decimals: generated X.Y vs X.ZW questions; custom: --file prompts.jsonl; replicate: the suite")
    ex.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id")
    ex.add_argument("--db", default=None, help="neuron database (default: data/<model>.duckdb)")
    ex.add_argument("--steer", action="append", default=[], metavar="SPEC",
                    help="'concept:mode:k[:key=value…]', e.g. 'Bible verses:suppress:500' (repeatable; replicate "
                         f"default: {'; '.join(DEFAULT_CONCEPTS)})")
    ex.add_argument("--steer-url", default=None, metavar="STRING", help="specs from a shared steering link (c1.…)")
    ex.add_argument("--concept-control", action="append", default=None, metavar="SPEC",
                    help="another concept reported beside the specs, e.g. 'decimal numbers:suppress:500' "
                         f"(replicate default: {'; '.join(DEFAULT_CONCEPT_CONTROLS)})")
    ex.add_argument("--controls", type=int, default=DEFAULT_CONTROLS,
                    help="random controls per spec, matched on layers and activation mass (0: none)")
    ex.add_argument("--no-mass-match", action="store_true", help="draw controls uniformly within each layer")
    ex.add_argument("--k", default=None, metavar="K1,K2,…", help="dose–response: also steer each spec's top K1, K2, … "
                                                                   "(e.g. 50,100,250,500,1000)")
    ex.add_argument("--strength", default=None, metavar="S1,S2,…",
                    help="strength sweep: also replace each spec's neurons by S × its extreme quantile (0 = suppress)")
    ex.add_argument("--n", type=int, default=None, help="sample this many prompts (seeded); default all")
    ex.add_argument("--pairs", type=int, default=None,
                    help="decimals: sample this many pairs, each in both orders (default 150); replicate: pairs per "
                         "cell (default 25)")
    ex.add_argument("--seed", type=int, default=0, help="seed for sampling, controls and bootstrap")
    ex.add_argument("--set", dest="set_name", choices=list(SETS), default=None,
                    help="decimals: the prompt set (default shorter: " + SETS["shorter"] + ")")
    ex.add_argument("--format", dest="format_name", choices=list(FORMATS), default="chat",
                    help="decimals: the question wording (default chat)")
    ex.add_argument("--x-range", default=None, metavar="LO-HI",
                    help=f"whole parts of the numbers (default {DEFAULT_X_RANGE[0]}-{DEFAULT_X_RANGE[1]}: none reads "
                         "as a date; the classic set defaults to 1-10)")
    ex.add_argument("--no-dates", action="store_true", help="drop pairs where either number reads as a month.day date")
    ex.add_argument("--template", default=None, help="decimals: your own wording with {a} and {b} (chat format)")
    ex.add_argument("--larger", choices=["shorter", "longer"], default=None,
                    help="decimals, as before: shorter = the classic 9.8-vs-9.11 grid (confounded), longer = its mirror")
    ex.add_argument("--prefix", default=None, help="assistant reply stem (decimals: the format's; custom default '')")
    ex.add_argument("--file", default=None, help="custom: JSON lines of {prompt, correct, wrong[, pair, system]}")
    ex.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="replicate: question formats")
    ex.add_argument("--sets", default=",".join(DEFAULT_SETS), help="replicate: prompt sets")
    ex.add_argument("--no-heldout", action="store_true", help="replicate: skip the held-out wording and range")
    ex.add_argument("--no-copy-check", action="store_true", help="replicate: skip the scorer check")
    ex.add_argument("--out", default=None, metavar="DIR",
                    help="replicate: report folder (default data/reports/replication-<model>-<time>)")
    ex.add_argument("--html", action="store_true", help="replicate: also write a self-contained report.html")
    ex.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ex.add_argument("--no-greedy", action="store_true", help="forced choice only")
    ex.add_argument("--greedy-controls", action="store_true", help="also decode greedy replies for random controls")
    ex.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ex.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores)")
    ex.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    ex.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown table to PATH")
    ex.add_argument("--per-item", action="store_true", help="include per-prompt results in the JSON")
    ex.set_defaults(func=cmd_experiment)


def _numbers(text: str | None, kind, name: str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MonitorError(f"{name} must be a comma-separated list of numbers, e.g. 50,100,250.") from None


def _range(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if not text:
        return default
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi if sep else lo))
    except ValueError:
        raise MonitorError(f"--x-range {text!r} must look like 13-40.") from None


def _items(args):
    """(items, stem, what) for decimals and custom."""
    if args.which == "custom":
        if not args.file:
            raise MonitorError("`experiment custom` needs --file prompts.jsonl "
                               "(one {\"prompt\": …, \"correct\": …, \"wrong\": …} per line).")
        items = load_items(args.file)
        return sample_items(items, args.n, args.seed), ("" if args.prefix is None else args.prefix), {"file": args.file}
    if args.file:
        raise MonitorError("--file is for `experiment custom`; the decimals experiment builds its own prompts.")
    set_name = args.set_name or {"shorter": "classic", "longer": "longer", None: "shorter"}[args.larger]
    x_range = _range(args.x_range, (1, 10) if set_name == "classic" else DEFAULT_X_RANGE)
    fmt = FORMATS[args.format_name]
    if args.template:
        fmt = Format("custom", args.template, fmt.stem, "the --template wording")
    pairs = sample_items(decimal_pairs(set_name, x_range, dates=not args.no_dates), args.pairs or 150, args.seed)
    items = sample_items(format_items(pairs, fmt), args.n, args.seed)
    stem = fmt.stem if args.prefix is None else args.prefix
    return items, stem, {"set": set_name, "format": fmt.name, "template": fmt.template, "x_range": list(x_range)}


def _open(args, need_db: bool):
    """(lm, db or None, db label) — the database first: a missing one fails before the model loads."""
    from cache.db import open_database
    from cache.paths import db_path
    from engine.loader import load_model

    db = label = None
    if need_db:
        path = Path(args.db) if args.db else db_path(args.model)
        db = open_database(path, model=args.model)
        label = str(path)
    lm = load_model(args.model)
    if db is not None and (db.n_layers, db.n_neurons) != (lm.n_layers, lm.n_neurons):
        raise MonitorError(f"{label} describes a {db.n_layers}×{db.n_neurons} model but {lm.name} is "
                           f"{lm.n_layers}×{lm.n_neurons}: pass the database built for this model with --db.")
    return lm, db, label


def cmd_lint(args) -> int:
    from engine.cli import _chat_from_args, check_objective_args, faithfulness_from_args, trace_from_args
    from engine.linter import cluster_cells

    from .lint import lint_trace

    check_objective_args(args, require_objective=True)
    lm, db, _ = _open(args, True)
    trace = trace_from_args(lm, _chat_from_args(args), args)
    from tqdm import tqdm

    with tqdm(desc="causal check", unit="group", disable=args.json, leave=False) as bar:
        report = lint_trace(db, trace, k=args.k, labeler="env", lm=lm, n_null=args.null, seed=args.seed,
                            causal_progress=bar.update)
    out = {"objective": trace.objective.label, "objective_value": trace.objective_value, **report.to_dict()}
    if args.faithfulness:
        extra = [(f"cluster #{c.id + 1} {c.label}", cluster_cells(c)) for c in report.clusters]
        out["faithfulness"] = faithfulness_from_args(lm, trace, args.faithfulness, args.json, extra)
    if args.json:
        import json

        print(json.dumps(out, ensure_ascii=False, default=float))
        return 0
    print(f"objective: {out['objective']} = {out['objective_value']:.4f}")
    print(f"{report.n_hits} important neurons, {len(report.clusters)} clusters; causal check: "
          f"{(report.causal or {}).get('n_null', 0)} matched random sets each")
    for c in report.clusters:
        flag = "SPURIOUS" if c.spurious else "unrelated" if c.unrelated else "related"
        print(f"#{c.id + 1} [{flag}] {c.label} ({len(c.members)} neurons): {c.effect_text or c.explanation}")
    if "faithfulness" in out:
        print(f"faithfulness: Spearman ρ(predicted, measured) = {out['faithfulness']['spearman']:.3f} over "
              f"{len(out['faithfulness']['rows'])} groups")
    return 0


def cmd_experiment(args) -> int:
    at_least(args.controls, 0, "--controls")
    at_least(args.max_new_tokens, 0, "--max-new-tokens")
    at_least(args.batch_size, 1, "--batch-size")
    if args.pairs is not None:
        at_least(args.pairs, 1, "--pairs")
    doses = _numbers(args.k, int, "--k")
    strengths = _numbers(args.strength, float, "--strength")
    if args.threads is not None:
        at_least(args.threads, 1, "--threads")
        import torch

        torch.set_num_threads(args.threads)
    specs = [ConceptSpec.parse(s) for s in args.steer]
    if args.steer_url:
        specs += specs_from_url(args.steer_url)
    if args.which == "replicate":
        return _replicate(args, specs, doses, strengths)
    ctrl_specs = [ConceptSpec.parse(s) for s in (args.concept_control or [])]
    items, stem, what = _items(args)
    lm, db, db_label = _open(args, bool(specs or ctrl_specs))
    selections, ctrl_sel, quantiles, mass = [], [], None, None
    if db is not None:
        resolved = resolve(db, specs + ctrl_specs)
        quantiles = resolved.quantiles
        sels = resolved.selections
        selections, ctrl_sel = sels[: len(specs)], sels[len(specs):]
        if doses or strengths:
            from engine.replication import dose_selections

            selections = selections + dose_selections(selections, doses, strengths)
            if any(s.spec.mode == "strengthen" for s in selections) and quantiles is None:
                from .resolve import steering_quantiles

                quantiles = steering_quantiles(db)
        if args.controls and not args.no_mass_match and selections:
            from engine.controls import activation_mass

            sample = sample_items(items, 16, args.seed)
            mass = activation_mass(lm, [it.chat() for it in sample], activation_view(db))
    conditions = build_conditions(selections, lm.n_neurons, args.controls if selections else 0, args.seed, mass,
                                  ctrl_sel)
    import torch

    config = {"experiment": args.which, "model": lm.name, "db": db_label, "seed": args.seed,
              "threads": torch.get_num_threads(), "specs": [s.to_dict() for s in specs],
              "concept_controls": [s.to_dict() for s in ctrl_specs], "controls": args.controls,
              "mass_matched": mass is not None, **what}
    bar = _progress_bar(len(items) * len(conditions))
    result = run_experiment(lm, items, conditions, quantiles, stem, not args.no_greedy, args.max_new_tokens,
                            args.batch_size, config, progress=bar, greedy_controls=args.greedy_controls)
    bar.close()
    summary = analyze(result, seed=args.seed)
    if args.per_item:
        summary["items"] = [{"prompt": it.prompt, "correct": it.correct, "wrong": it.wrong, "pair": it.pair}
                            for it in items]
        for row, sc in zip(summary["conditions"], result.scores):
            row["per_item"] = {"complete": sc.correct_of("complete").tolist(),
                               "first_diff": sc.correct_of("first_diff").tolist(),
                               "margin": [round(float(m), 4) for m in sc.margin],
                               "greedy": sc.greedy, "greedy_verdict": sc.greedy_verdict}
    table = to_markdown(summary)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json:
        print(to_json(summary))
    else:
        print(table)
    sys.stdout.flush()
    return 0


def _replicate(args, specs, doses, strengths) -> int:
    from engine.loader import data_dir, model_slug
    from engine.replication import Suite, run_suite, save_report

    specs = specs or [ConceptSpec.parse(s) for s in DEFAULT_CONCEPTS]
    ctrl_specs = [ConceptSpec.parse(s) for s in (DEFAULT_CONCEPT_CONTROLS if args.concept_control is None
                                                 else args.concept_control)]
    suite = Suite(formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                  sets=tuple(s.strip() for s in args.sets.split(",") if s.strip()),
                  pairs=args.pairs or Suite.pairs, x_range=_range(args.x_range, DEFAULT_X_RANGE),
                  controls=args.controls, seed=args.seed, heldout=not args.no_heldout, doses=doses,
                  strengths=strengths, copy_check=not args.no_copy_check, greedy=not args.no_greedy,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    suite.check()
    lm, db, db_label = _open(args, True)
    resolved = resolve(db, specs + ctrl_specs)
    quantiles = resolved.quantiles
    if strengths and any(s != 0 for s in strengths) and quantiles is None:
        from .resolve import steering_quantiles

        quantiles = steering_quantiles(db)
    sels = resolved.selections
    view = None if args.no_mass_match else activation_view(db)
    config = {"model": lm.name, "db": db_label, "specs": [s.to_dict() for s in specs],
              "concept_controls": [s.to_dict() for s in ctrl_specs]}
    bar = _progress_bar(0)
    report = run_suite(lm, sels[: len(specs)], suite, sels[len(specs):], quantiles, view, config, progress=bar.total_of)
    bar.close()
    out = Path(args.out) if args.out else data_dir() / "reports" / \
        f"replication-{model_slug(args.model)}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = save_report(report, out, html_page=args.html)
    if args.json:
        print(Path(paths["json"]).read_text(encoding="utf-8"))
    else:
        print(Path(paths["markdown"]).read_text(encoding="utf-8"))
        print(f"Report written to {out} ({', '.join(Path(p).name for p in paths.values())}).", file=sys.stderr)
    return 0


class _progress_bar:
    """tqdm on stderr: per condition (``__call__``) or per stage with a known total (``total_of``)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="prompt", dynamic_ncols=True, leave=False)
        self.last: dict[str, int] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        self.bar.set_description(name[:40])
        self.bar.update(done - self.last.get(name, 0))
        self.last[name] = done

    def total_of(self, stage: str, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.set_description(stage[:48])
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
