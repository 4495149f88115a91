"""Steering experiments: conditions, running them, and the report with controls and statistics.

Provides:

* :class:`Condition` and :func:`build_conditions`: baseline, each spec, their union, random controls;
* :func:`run_experiment` → :class:`ExperimentResult`: every condition scored on the same items
  (:func:`engine.scoring.score`);
* :func:`analyze`, :func:`verdict`, :func:`to_markdown`: accuracies with intervals, paired
  tests against the baseline and the controls, a plain-language verdict, a Markdown table.

The headline experiment: "Which is bigger: 9.8 or 9.11?". Suppressing the neurons that
match "Bible verses" and "dates" was reported to help Llama-3.1-8B; a replication found it
fragile. So every run scores the same prompts under:

* ``baseline``: no steering;
* each concept spec alone, and the union of all specs;
* ``controls`` random-neuron controls: as many neurons per layer as the union, same
  mode and token range (:func:`engine.controls.random_control`), one seed each.

Statistics (:mod:`engine.stats`): accuracy with 95% bootstrap intervals, exact McNemar
tests of each condition against the baseline and against every control. The command line
is ``python -m engine experiment`` (:mod:`concepts.cli`: it resolves specs in the database).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .prompt_sets import DECIMALS_PREFIX, Item
from .scoring import DEFAULT_BATCH, DEFAULT_MAX_NEW_TOKENS, Scores, prepare, score


@dataclass
class Condition:
    """One steering setting of an experiment."""

    name: str
    kind: str  # baseline | spec | union | control
    interventions: list = field(default_factory=list)
    seed: int | None = None

    @property
    def n_neurons(self) -> int:
        return len({(l, n) for iv in self.interventions for l, n, _ in iv.neurons})

    def per_layer(self) -> dict[int, int]:
        from .specs import layer_counts

        return layer_counts((l, n) for iv in self.interventions for l, n, _ in iv.neurons)


def build_conditions(selections, n_neurons: int, controls: int = 3, seed: int = 0) -> list[Condition]:
    """baseline, each selection alone, their union (when more than one), and ``controls``
    random controls matching the union per layer (seeds ``seed, seed+1, …``)."""
    from .controls import random_control
    from .specs import union

    conds = [Condition("baseline", "baseline")]
    sels = [s for s in selections if s.spec.enabled]
    for s in sels:
        conds.append(Condition(s.spec.label, "spec", union([s]).interventions))
    if not sels:
        return conds
    u = union(sels)
    if len(sels) > 1:
        conds.append(Condition("union of " + " + ".join(s.spec.concept for s in sels), "union", u.interventions))
    for i in range(int(controls)):
        conds.append(Condition(f"random control {i + 1} (seed {seed + i})", "control",
                               random_control(u.interventions, n_neurons, seed + i), seed + i))
    return conds


# --------------------------------------------------------------------------- running and reporting
@dataclass
class ExperimentResult:
    items: list[Item]
    conditions: list[Condition]
    scores: list[Scores]
    config: dict
    seconds: float


def run_experiment(lm, items: Sequence[Item], conditions: Sequence[Condition], quantiles=None,
                   prefix: str = DECIMALS_PREFIX, greedy: bool = True, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = DEFAULT_BATCH, config: dict | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> ExperimentResult:
    """Score ``items`` under every condition. ``progress(condition name, done, total)``."""
    t0 = time.perf_counter()
    prep = prepare(lm, items, prefix)
    scores = []
    for cond in conditions:
        done = [0]

        def tick(k, name=cond.name):
            done[0] += k
            if progress is not None:
                progress(name, done[0], len(items))

        scores.append(score(lm, prep, cond.interventions, quantiles, greedy, max_new_tokens, batch_size, tick))
    cfg = dict(config or {})
    cfg.update({"prefix": prefix, "greedy": greedy, "max_new_tokens": max_new_tokens, "n": len(items)})
    return ExperimentResult(list(items), list(conditions), scores, cfg, time.perf_counter() - t0)


def analyze(result: ExperimentResult, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracies with bootstrap intervals and paired tests, JSON-ready.

    For each condition and metric (``forced_choice``, ``greedy``): accuracy and its
    percentile-bootstrap interval; against the baseline: the difference, its paired
    bootstrap interval and McNemar's exact p; for spec and union conditions, against the
    controls: the difference from the controls' mean per-prompt accuracy (paired
    bootstrap interval) and McNemar's p against each control (``p_max`` is the largest:
    below α, the condition differs from *every* control at that level).
    """
    from .stats import accuracy_summary, mcnemar_exact, paired_bootstrap_diff_ci

    metrics = {"forced_choice": [s.fc_correct for s in result.scores]}
    if result.config.get("greedy", True):
        metrics["greedy"] = [s.greedy_correct for s in result.scores]
    base_i = next(i for i, c in enumerate(result.conditions) if c.kind == "baseline")
    ctrl_i = [i for i, c in enumerate(result.conditions) if c.kind == "control"]
    rows = []
    for i, (cond, sc) in enumerate(zip(result.conditions, result.scores)):
        row = {"name": cond.name, "kind": cond.kind, "neurons": cond.n_neurons, "per_layer": cond.per_layer(),
               "seconds": sc.seconds, "mean_margin": float(np.mean(sc.margin))}
        if cond.seed is not None:
            row["seed"] = cond.seed
        for metric, vecs in metrics.items():
            x = vecs[i]
            m = accuracy_summary(x, level, seed=seed)
            if i != base_i:
                b = vecs[base_i]
                m["vs_baseline"] = {"diff": float(x.mean() - b.mean()),
                                    "ci": paired_bootstrap_diff_ci(x, b, level, seed=seed), **mcnemar_exact(x, b)}
            if cond.kind in ("spec", "union") and ctrl_i:
                cm = np.mean([vecs[j] for j in ctrl_i], axis=0)
                tests = [mcnemar_exact(x, vecs[j]) for j in ctrl_i]
                m["vs_controls"] = {"diff": float(x.mean() - cm.mean()),
                                    "ci": paired_bootstrap_diff_ci(x, cm, level, seed=seed),
                                    "p": [t["p"] for t in tests], "p_max": max(t["p"] for t in tests)}
            if metric == "greedy":
                m["other_rate"] = float(np.mean([v == "other" for v in result.scores[i].greedy_verdict]))
            row[metric] = m
        rows.append(row)
    summary = {"config": result.config, "n": len(result.items), "seconds": result.seconds, "conditions": rows}
    if ctrl_i:
        summary["controls"] = {
            metric: {"mean": float(np.mean([vecs[j].mean() for j in ctrl_i])),
                     "min": float(min(vecs[j].mean() for j in ctrl_i)),
                     "max": float(max(vecs[j].mean() for j in ctrl_i))}
            for metric, vecs in metrics.items()}
    summary["verdict"] = verdict(summary)
    return summary


def verdict(summary: dict, alpha: float = 0.05) -> str:
    """A plain-language reading of the forced-choice results, controls included."""
    rows = summary["conditions"]
    base = next(r for r in rows if r["kind"] == "baseline")["forced_choice"]["acc"]
    steered = [r for r in rows if r["kind"] in ("spec", "union")]
    if not steered:
        return f"Baseline forced-choice accuracy {base:.1%} (no steering conditions)."
    parts = [f"Baseline forced-choice accuracy {base:.1%}."]
    ctrl = summary.get("controls", {}).get("forced_choice")
    if ctrl:
        parts.append(f"Random controls: {ctrl['min']:.1%}–{ctrl['max']:.1%} (mean {ctrl['mean']:.1%}).")
    for r in steered:
        fc = r["forced_choice"]
        vb = fc["vs_baseline"]
        text = f"{r['name']}: {fc['acc']:.1%} ({vb['diff']:+.1%} vs baseline, McNemar p = {vb['p']:.3g}"
        if "vs_controls" in fc:
            vc = fc["vs_controls"]
            text += f"; {vc['diff']:+.1%} vs the controls' mean, largest p vs a control = {vc['p_max']:.3g}"
        text += ")"
        word = "better" if vb["diff"] > 0 else "worse"
        if vb["p"] < alpha and "vs_controls" in fc and fc["vs_controls"]["p_max"] < alpha \
                and (fc["vs_controls"]["diff"] > 0) == (vb["diff"] > 0):
            text += f" — significantly {word} than the baseline and than every random control."
        elif vb["p"] < alpha and "vs_controls" in fc:
            text += f" — {word} than the baseline, but not significantly different from every random control of " \
                    "the same size, so the change is not shown to be specific to the concept."
        elif vb["p"] < alpha:
            text += f" — {word} than the baseline (no controls run)."
        else:
            text += " — no significant change from the baseline."
        parts.append(text)
    parts.append("(Exact McNemar p-values, two-sided, per comparison, not corrected for multiple comparisons.)")
    return " ".join(parts)


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def to_markdown(summary: dict) -> str:
    """The results as a Markdown table plus the runtime and the verdict."""
    has_greedy = any("greedy" in r for r in summary["conditions"])
    head = ["condition", "neurons", "forced-choice acc % [95% CI]", "Δ vs base (pp)", "p vs base", "p vs controls (max)",
            "mean logp(correct)−logp(wrong)"]
    if has_greedy:
        head += ["greedy acc % [95% CI]", "Δ vs base (pp)", "p vs base", "p vs controls (max)"]
    head.append("time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["conditions"]:
        cells = [r["name"], str(r["neurons"])]
        metrics = ["forced_choice"] + (["greedy"] if has_greedy else [])
        for metric in metrics:
            m = r.get(metric)
            if m is None:
                cells += ["–"] * 4
                continue
            vb, vc = m.get("vs_baseline"), m.get("vs_controls")
            cells += [f"{_pct(m['acc'])} [{_pct(m['lo'])}, {_pct(m['hi'])}]",
                      f"{100 * vb['diff']:+.1f}" if vb else "",
                      _p(vb["p"]) if vb else "",
                      _p(vc["p_max"]) if vc else ""]
            if metric == "forced_choice":
                cells.append(f"{r['mean_margin']:+.3f}")
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    cfg = summary["config"]
    lines.append("")
    lines.append(f"n = {summary['n']} prompts; model {cfg.get('model', '?')}; database {cfg.get('db', '–')}; "
                 f"seed {cfg.get('seed', '?')}; stem {cfg.get('prefix', '')!r}; "
                 f"greedy ≤ {cfg.get('max_new_tokens')} tokens; total runtime {summary['seconds']:.0f} s.")
    lines.append("")
    lines.append(summary["verdict"])
    return "\n".join(lines)

