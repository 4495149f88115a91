"""Benchmark: the cost of steering a generation, and of the default decimals experiment.

``python -m benchmarks.steering --json`` prints one JSON object:

* ``generation``: the median wall time of one greedy 32-token generation of the headline
  prompt, unsteered and steered, measured alternately in the same process after a
  warm-up; ``ratio = steered / unsteered`` (target ≤ 1.15). Two steerings are timed:
  the default token range (the last user turn) and ``prompt+generated`` (the ops then run
  on every decoding step too; if that steering ends the reply early, its ratio is taken
  against an unsteered generation of the same length). The steered neurons are the union of
  "Bible verses:suppress:500" and "dates:suppress:500" resolved in the database
  (``--db``, default ``data/<model>.duckdb``); without a database, 1,000 random neurons
  spread over every layer (``"neurons_source": "random"``).
* ``experiment`` (only with ``--experiment``, slow): the wall time of the default replication
  suite, ``python -m engine experiment replicate`` run in-process (4 formats × 3 sets + the
  held-out cell, 2 concepts with 20 matched controls each, a concept control, the union, the
  scorer check; target ≤ 900 s), with scorings per second, the bare forward's tokens per second
  on the same kind of prompts (the baseline: the speed with no scoring or steering overhead),
  ``forward_tokens`` (token positions the suite's forwards process, counted from its items),
  ``bare_floor_s`` (those tokens at the bare forward's speed: no scorer can beat it without
  doing less arithmetic), ``overhead_ratio`` (wall / floor) and the pooled results.

Timings on a shared machine are noisy; the ratio compares runs interleaved in one process
(order alternating), and ``ops_ratio_*`` adds the steering ops timed in isolation to the
unsteered median, which is what the ratio measures without the machine's noise.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.specs import ConceptSpec, union  # noqa: E402
from engine.errors import MonitorError  # noqa: E402
from engine.generate import generate  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.steering import Intervention, TokenRange  # noqa: E402

PROMPT = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]
SPECS = ("Bible verses:suppress:500", "dates:suppress:500")


def steering_neurons(lm, db_path: str | None) -> tuple[list[tuple[int, int, int]], str]:
    """The union of the default specs' neurons, or random ones when no database is found."""
    try:
        from concepts.resolve import select_all
        from cache.db import open_database

        db = open_database(db_path, model=lm.name) if db_path else open_database(model=lm.name)
        u = union(select_all(db, [ConceptSpec.parse(s) for s in SPECS]))
        return [n for iv in u.interventions for n in iv.neurons], str(db.path)
    except MonitorError:
        rng = np.random.default_rng(0)
        flat = rng.choice(lm.n_layers * lm.n_neurons, size=1000, replace=False)
        return [(int(i // lm.n_neurons), int(i % lm.n_neurons), 1) for i in sorted(flat)], "random"


def time_generation(lm, runs: dict, repeats: int) -> dict:
    """Median seconds per generation for each named (interventions, max_new_tokens), runs interleaved."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    lengths: dict[str, int] = {}
    for ivs, tokens in runs.values():  # warm-up
        generate(lm, PROMPT, max_new_tokens=tokens, interventions=ivs)
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order so drift cancels
            ivs, tokens = runs[name]
            t0 = time.perf_counter()
            g = generate(lm, PROMPT, max_new_tokens=tokens, interventions=ivs)
            times[name].append(time.perf_counter() - t0)
            lengths[name] = len(g.token_ids)
    return {name: {"median_s": statistics.median(ts), "tokens": lengths[name]} for name, ts in times.items()}


def hook_ops_cost(lm, interventions, tokens: int, repeats: int = 200) -> dict:
    """Seconds the steering ops themselves take per generation (noise-robust complement).

    Times :func:`engine.steering.apply_layer_ops` for every steered layer on tensors shaped
    like the real ones: once over the prompt ``[1, prompt_len, neurons]`` and ``tokens − 1``
    times on one decoding position ``[1, 1, neurons]``.
    """
    from engine.chat import render_chat
    from engine.steering import apply_layer_ops, compile_interventions

    rendered = render_chat(lm.tokenizer, PROMPT)
    n = len(rendered)
    compiled = compile_interventions(interventions, rendered, lm.n_layers, lm.n_neurons)
    ops = [o for rounds in compiled.layers.values() for o in rounds]
    x_prompt = torch.randn(1, n, lm.n_neurons)
    x_step = torch.randn(1, 1, lm.n_neurons)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(repeats):
            for o in ops:
                apply_layer_ops(x_prompt, o, 0, n)
        prompt_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            for o in ops:
                apply_layer_ops(x_step, o, n + 1, n)
        step_s = (time.perf_counter() - t0) / repeats
    return {"prompt_s": prompt_s, "per_step_s": step_s, "per_generation_s": prompt_s + (tokens - 1) * step_s}


def bare_tokens_per_s(lm, items, stem: str, batch: int = 64) -> float:
    """Tokens per second of an unhooked forward over the items' prompts, stem and correct answer,
    batched like the scorer (same-length groups): the speed the suite would have with no overhead."""
    from engine.chat import render_chat

    seqs = [render_chat(lm.tokenizer, it.chat()).input_ids.tolist()
            + lm.tokenizer(stem + it.correct, add_special_tokens=False)["input_ids"] for it in items]
    groups: dict[int, list] = {}
    for s_ in seqs:
        groups.setdefault(len(s_), []).append(s_)
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for group in groups.values():
            for i in range(0, len(group), batch):
                ids = torch.tensor(group[i:i + batch], device=lm.device)
                lm.model(input_ids=ids, logits_to_keep=1)
                tokens += ids.numel()
    return tokens / (time.perf_counter() - t0)


def suite_forward_tokens(lm, report: dict, batch_size: int) -> int:
    """Token positions the suite's forward passes process, counted from its prepared items (no
    model run): per cell and condition, the shared head, every item's prompt after the head, the
    candidates (each padded to its batch's longest) and the greedy replies, plus the scorer check
    and the mass measurement's prompts are left out (small). Divided by the bare forward's
    tokens per second it gives the suite's compute floor on this machine."""
    from engine.replication import RESULTS_KEY
    from engine.scoring import item_batches, prepare

    total = 0
    for res in report[RESULTS_KEY]["cells"]:
        prep = prepare(lm, res.items, res.config.get("prefix", ""))
        n_cond = len(res.conditions)
        per_condition = 0
        for members in prep.groups.values():
            per_condition += prep.common
            for idx in item_batches(members, batch_size):
                rows = [prep.rows[i] for i in idx]
                longest = max(len(c) for r in rows for c in r.cands)
                per_condition += sum(len(r.ids) - prep.common + len(r.cands) * longest for r in rows)
        total += per_condition * n_cond
        for sc in res.scores:  # greedy replies: one position per generated token
            total += sum(len(lm.tokenizer(g, add_special_tokens=False)["input_ids"]) + len(prep.tail)
                         for g in sc.greedy if g)
    return total


def run_suite_timing(lm, db_path: str | None, pairs: int, controls: int, seed: int, report_dir: str | None = None) -> dict:
    """Wall time of the default replication suite (``python -m engine experiment replicate``);
    its report is saved to ``report_dir`` when given."""
    from cache.db import open_database
    from concepts.cli import DEFAULT_CONCEPT_CONTROLS, DEFAULT_CONCEPTS
    from concepts.resolve import activation_view, resolve
    from engine.prompt_sets import FORMATS, decimal_pairs, format_items, sample_pairs
    from engine.replication import Suite, effect_rows, run_suite

    t0 = time.perf_counter()
    db = open_database(db_path, model=lm.name) if db_path else open_database(model=lm.name)
    specs = [ConceptSpec.parse(s) for s in DEFAULT_CONCEPTS]
    ctrl = [ConceptSpec.parse(s) for s in DEFAULT_CONCEPT_CONTROLS]
    resolved = resolve(db, specs + ctrl)
    suite = Suite(pairs=pairs, controls=controls, seed=seed)
    report = run_suite(lm, resolved.selections[: len(specs)], suite, resolved.selections[len(specs):],
                       resolved.quantiles, activation_view(db), {"model": lm.name, "db": str(db.path)})
    wall = time.perf_counter() - t0
    if report_dir:
        from engine.replication import save_report

        save_report(report, report_dir, html_page=True)
    scorings = sum(c["summary"]["n"] for c in report["cells"]) * report["conditions_per_cell"]
    sample = format_items(sample_pairs(decimal_pairs("shorter"), 32, seed), "chat")
    bare = bare_tokens_per_s(lm, sample, FORMATS["chat"].stem)
    tokens = suite_forward_tokens(lm, report, suite.batch_size)
    tokens_per_item = sum(len(lm.tokenizer(it.prompt)["input_ids"]) for it in sample) / len(sample)
    return {
        "wall_s": round(wall, 1), "target_s": 900, "cells": len(report["cells"]),
        "pairs_total": sum(c["pairs"] for c in report["cells"]), "conditions_per_cell": report["conditions_per_cell"],
        "controls_per_concept": controls, "scorings": scorings, "scorings_per_s": round(scorings / wall, 2),
        "bare_forward_tokens_per_s": round(bare, 1),
        # The floor: the suite's token positions through a bare forward at the rate just measured.
        "forward_tokens": tokens, "bare_floor_s": round(tokens / bare, 1),
        "overhead_ratio": round(wall / (tokens / bare), 2),
        "seconds_per_scoring": round(wall / scorings, 4),
        "copy_check": report.get("copy_check"),
        "pooled": {r["condition"]: {"diff": round(r["diff"], 4), "call": r["call"],
                                    "percentile": r["percentile"]} for r in effect_rows(report) if r["cell"] == "pooled"},
        "baseline_acc": next(r for r in report["pooled"]["conditions"] if r["kind"] == "baseline")["complete"]["acc"],
        "user_tokens_per_item": round(tokens_per_item, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.steering", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--db", default=None, help="neuron database (default: data/<model>.duckdb, else random neurons)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--experiment", action="store_true", help="also time the default replication suite (slow: minutes)")
    p.add_argument("--pairs", type=int, default=None, help="pairs per cell (default: the suite's)")
    p.add_argument("--controls", type=int, default=None, help="random controls per concept (default: the suite's)")
    p.add_argument("--report", default=None, metavar="DIR", help="with --experiment: also save the suite's report here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    neurons, source = steering_neurons(lm, args.db)
    last_user = [Intervention(neurons, "replace", 0.0, tokens=TokenRange("last_user"))]
    everywhere = [Intervention(neurons, "replace", 0.0, tokens=TokenRange("prompt", generated=True))]
    # Steering every generated token can change where the reply ends; its baseline is an
    # unsteered generation of the same length.
    n_everywhere = len(generate(lm, PROMPT, max_new_tokens=args.tokens, interventions=everywhere).token_ids)
    runs = {"unsteered": (None, args.tokens), "steered_last_user": (last_user, args.tokens),
            "steered_prompt_generated": (everywhere, args.tokens)}
    if n_everywhere != args.tokens:
        runs["unsteered_same_length"] = (None, n_everywhere)
    gen = time_generation(lm, runs, args.repeats)
    base = gen["unsteered"]["median_s"]
    base_same = gen.get("unsteered_same_length", gen["unsteered"])["median_s"]
    out = {
        "model": lm.name, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "neurons": len({(l, n) for l, n, _ in neurons}), "neurons_source": source,
        "generation": {
            "tokens": args.tokens, "repeats": args.repeats, **gen,
            "ratio": gen["steered_last_user"]["median_s"] / base,
            "ratio_prompt_generated": gen["steered_prompt_generated"]["median_s"] / base_same,
            "target_ratio": 1.15,
        },
    }
    # The ops alone, timed in isolation: (unsteered + ops) / unsteered is the ratio without machine noise.
    for name, ivs in (("last_user", last_user), ("prompt_generated", everywhere)):
        cost = hook_ops_cost(lm, ivs, args.tokens)
        out["generation"][f"ops_{name}"] = cost
        out["generation"][f"ops_ratio_{name}"] = (base + cost["per_generation_s"]) / base
    if args.experiment:
        from engine.replication import Suite

        out["experiment"] = run_suite_timing(lm, None if source == "random" else source, args.pairs or Suite.pairs,
                                             Suite.controls if args.controls is None else args.controls, args.seed,
                                             args.report)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
