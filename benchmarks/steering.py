"""Benchmark: the cost of steering a generation, and of the default decimals experiment.

``python -m benchmarks.steering --json`` prints one JSON object:

* ``generation``: the median wall time of one greedy 32-token generation of the headline
  prompt, unsteered and steered, measured alternately in the same process after a
  warm-up; ``ratio = steered / unsteered`` (target ≤ 1.15), and per generated token in
  case steering ends a generation early. Two steerings are timed:
  the default token range (the last user turn) and ``prompt+generated`` (the ops then run
  on every decoding step too). The steered neurons are the union of
  "Bible verses:suppress:500" and "dates:suppress:500" resolved in the database
  (``--db``, default ``cache/<model>.duckdb``); without a database, as many random neurons
  spread over every layer (``"neurons_source": "random"``).
* ``experiment`` (only with ``--experiment``, slow): the wall time of
  ``python -m engine experiment decimals --n 200`` with those 2 specs and 3 controls,
  run in-process (target ≤ 600 s), and its forced-choice accuracies.

Timings on a shared machine are noisy; the ratio compares runs interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.concepts import ConceptSpec, union  # noqa: E402
from engine.errors import MonitorError  # noqa: E402
from engine.generate import generate  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.steering import Intervention, TokenRange  # noqa: E402

PROMPT = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]
SPECS = ("Bible verses:suppress:500", "dates:suppress:500")


def steering_neurons(lm, db_path: str | None) -> tuple[list[tuple[int, int, int]], str]:
    """The union of the default specs' neurons, or random ones when no database is found."""
    try:
        from cache.concepts import select_all
        from cache.db import open_database

        db = open_database(db_path, model=lm.name) if db_path else open_database(model=lm.name)
        u = union(select_all(db, [ConceptSpec.parse(s) for s in SPECS]))
        return [n for iv in u.interventions for n in iv.neurons], str(db.path)
    except MonitorError:
        rng = np.random.default_rng(0)
        flat = rng.choice(lm.n_layers * lm.n_neurons, size=1000, replace=False)
        return [(int(i // lm.n_neurons), int(i % lm.n_neurons), 1) for i in sorted(flat)], "random"


def time_generation(lm, interventions_by_name: dict, tokens: int, repeats: int) -> dict:
    """Median seconds per generation for each named intervention list, runs interleaved."""
    times: dict[str, list[float]] = {k: [] for k in interventions_by_name}
    lengths: dict[str, int] = {}
    for ivs in interventions_by_name.values():  # warm-up
        generate(lm, PROMPT, max_new_tokens=tokens, interventions=ivs)
    for _ in range(repeats):
        for name, ivs in interventions_by_name.items():
            t0 = time.perf_counter()
            g = generate(lm, PROMPT, max_new_tokens=tokens, interventions=ivs)
            times[name].append(time.perf_counter() - t0)
            lengths[name] = len(g.token_ids)
    return {name: {"median_s": statistics.median(ts), "tokens": lengths[name]} for name, ts in times.items()}


def _per_token(t: dict) -> float:
    return t["median_s"] / max(1, t["tokens"])


def run_experiment_timing(lm, db_path: str | None, n: int, controls: int, seed: int) -> dict:
    from cache.concepts import select_all
    from cache.db import open_database
    from engine.experiments import analyze, build_conditions, decimal_items, run_experiment, sample_items

    t0 = time.perf_counter()
    db = open_database(db_path, model=lm.name) if db_path else open_database(model=lm.name)
    selections = select_all(db, [ConceptSpec.parse(s) for s in SPECS])
    conditions = build_conditions(selections, lm.n_neurons, controls, seed)
    items = sample_items(decimal_items(), n, seed)
    result = run_experiment(lm, items, conditions, config={"model": lm.name, "db": str(db.path), "seed": seed})
    summary = analyze(result, seed=seed)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall, "target_s": 600, "n": n, "conditions": len(conditions), "db": str(db.path),
        "per_condition_s": {r["name"]: round(r["seconds"], 1) for r in summary["conditions"]},
        "forced_choice_acc": {r["name"]: r["forced_choice"]["acc"] for r in summary["conditions"]},
        "greedy_acc": {r["name"]: r["greedy"]["acc"] for r in summary["conditions"] if "greedy" in r},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.steering", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--db", default=None, help="neuron database (default: cache/<model>.duckdb, else random neurons)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--experiment", action="store_true", help="also time the decimals experiment (slow: minutes)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--controls", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    neurons, source = steering_neurons(lm, args.db)
    gen = time_generation(lm, {
        "unsteered": None,
        "steered_last_user": [Intervention(neurons, "replace", 0.0, tokens=TokenRange("last_user"))],
        "steered_prompt_generated": [Intervention(neurons, "replace", 0.0, tokens=TokenRange("prompt", generated=True))],
    }, args.tokens, args.repeats)
    base = gen["unsteered"]["median_s"]
    out = {
        "model": lm.name, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "neurons": len({(l, n) for l, n, _ in neurons}), "neurons_source": source,
        "generation": {
            "tokens": args.tokens, "repeats": args.repeats, **gen,
            "ratio": gen["steered_last_user"]["median_s"] / base,
            "ratio_prompt_generated": gen["steered_prompt_generated"]["median_s"] / base,
            # Steering can end a generation early (end-of-sequence); per generated token is then the fair ratio.
            "per_token_ratio": _per_token(gen["steered_last_user"]) / _per_token(gen["unsteered"]),
            "per_token_ratio_prompt_generated": _per_token(gen["steered_prompt_generated"]) / _per_token(gen["unsteered"]),
            "target_ratio": 1.15,
        },
    }
    if args.experiment:
        out["experiment"] = run_experiment_timing(lm, None if source == "random" else source, args.n, args.controls,
                                                  args.seed)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
