"""Steering experiments: conditions, running them, and a report against a null of random controls.

Provides:

* :class:`Condition` and :func:`build_conditions`: the baseline, each concept spec, their union,
  concept controls (another concept at the same k, e.g. "decimal numbers") and, per spec, ``n``
  random controls matched on layer counts and activation mass (:func:`engine.controls.matched_controls`);
* :func:`run_experiment` → :class:`ExperimentResult`: every condition scored on the same items
  (:func:`engine.scoring.score`);
* :func:`analyze`: per condition and metric, accuracy with intervals, the change from the baseline
  with McNemar's exact test on pairs; per spec, where its change falls among its controls'
  changes; Holm's correction across the report's tests; a plain verdict (:func:`verdict`);
* :func:`to_markdown`: the report as a Markdown table; :func:`to_json`: as JSON text.

Metrics (:mod:`engine.scoring`): ``complete`` (complete-answer forced choice, the default and
the verdict's primary metric), ``first_diff`` (the first differing token), ``greedy`` (the
greedy reply, with its valid-answer rate). ``token_sum`` (length-biased) is kept in the JSON
only, to show the bias it had.

A spec's effect counts as **specific** only when (a) its change from the baseline is significant
by McNemar's exact test on pairs after Holm's correction, (b) its change lies beyond every one
of its random controls' changes, and (c) the t-based prediction p-value against the controls is
significant after Holm's correction, all in the same direction. A change that is significant
against the baseline but not against the controls is reported as **not specific**: steering
that many neurons anywhere does as much.

The command line is ``python -m engine experiment`` (:mod:`concepts.cli`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .prompt_sets import DECIMALS_PREFIX, Item, pair_ids
from .scoring import DEFAULT_BATCH, DEFAULT_MAX_NEW_TOKENS, Scores, prepare, score_many

DEFAULT_CONTROLS = 20
ALPHA = 0.05
VALID_MIN = 0.5  # below this greedy valid-answer rate, greedy accuracy is not a measurement
REPORT_METRICS = ("complete", "first_diff", "greedy")
METRIC_NAMES = {"complete": "forced choice (complete answers)", "first_diff": "forced choice (first differing token)",
                "greedy": "greedy reply", "token_sum": "token sum (length-biased)"}
STEERED_KINDS = ("spec", "union", "concept-control")


# --------------------------------------------------------------------------- conditions
@dataclass
class Condition:
    """One steering setting of an experiment."""

    name: str
    kind: str  # baseline | spec | union | concept-control | control
    interventions: list = field(default_factory=list)
    seed: int | None = None
    of: str | None = None  # a control: the name of the condition it is matched to
    mass_ratio: float | None = None  # a control: Σ its activation mass / Σ that condition's

    @property
    def n_neurons(self) -> int:
        return len({(l, n) for iv in self.interventions for l, n, _ in iv.neurons})

    def per_layer(self) -> dict[int, int]:
        from .specs import layer_counts

        return layer_counts((l, n) for iv in self.interventions for l, n, _ in iv.neurons)


def build_conditions(selections, n_neurons: int, controls: int = DEFAULT_CONTROLS, seed: int = 0,
                     mass: np.ndarray | None = None, concept_controls=(), union_controls: bool = False) -> list[Condition]:
    """The baseline, each enabled selection alone, their union (when more than one), each concept
    control, then ``controls`` random controls per spec (and per union with ``union_controls``),
    matched on layers and, given ``mass``, on activation mass. Spec ``j``'s controls use seeds
    ``seed + 1000·j + i``, so they differ between specs and repeat between runs."""
    from .controls import matched_controls
    from .specs import union

    conds = [Condition("baseline", "baseline")]
    sels = [s for s in selections if s.spec.enabled]
    steered = [Condition(s.spec.label, "spec", union([s]).interventions) for s in sels]
    conds += steered
    if len(sels) > 1:
        u = Condition("union of " + " + ".join(s.spec.concept for s in sels), "union", union(sels).interventions)
        conds.append(u)
        if union_controls:
            steered.append(u)
    conds += [Condition(f"{s.spec.label} [concept control]", "concept-control", union([s]).interventions)
              for s in concept_controls if s.spec.enabled]
    for j, target in enumerate(steered):
        for ivs, info in matched_controls(target.interventions, n_neurons, controls, seed + 1000 * j, mass):
            conds.append(Condition(f"control {info['seed'] - seed - 1000 * j + 1} of {target.name}", "control", ivs,
                                   info["seed"], target.name, info["mass_ratio"]))
    return conds


# --------------------------------------------------------------------------- running
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
                   progress: Callable[[str, int, int], None] | None = None,
                   greedy_controls: bool = False) -> ExperimentResult:
    """Score ``items`` under every condition (:func:`engine.scoring.score_many`: the conditions share
    forward passes). ``progress(label of the conditions being scored, done, total)`` counts item-conditions.

    Greedy replies (when ``greedy``) are decoded for the baseline and the steered conditions, and
    for the random controls only with ``greedy_controls`` (decoding costs about as much again).
    """
    t0 = time.perf_counter()
    prep = prepare(lm, items, prefix)
    scores: list[Scores | None] = [None] * len(conditions)
    # Conditions that decode, then the rest, each lot scored together in shared forward passes.
    decode = [greedy and (c.kind != "control" or greedy_controls) for c in conditions]
    for flag in (True, False):
        idx = [i for i, d in enumerate(decode) if d == flag]
        if not idx:
            continue
        label = ", ".join(conditions[i].name for i in idx[:2]) + (f" and {len(idx) - 2} more" if len(idx) > 2 else "")
        done = [0]

        def tick(k, label=label, total=len(items) * len(idx)):
            done[0] += k
            if progress is not None:
                progress(label, done[0], total)

        for i, sc in zip(idx, score_many(lm, prep, [conditions[i].interventions for i in idx], quantiles, flag,
                                         max_new_tokens, batch_size, tick)):
            scores[i] = sc
    cfg = dict(config or {})
    cfg.update({"prefix": prefix, "greedy": greedy, "greedy_controls": greedy_controls,
                "max_new_tokens": max_new_tokens, "n": len(items)})
    return ExperimentResult(list(items), list(conditions), scores, cfg, time.perf_counter() - t0)


# --------------------------------------------------------------------------- analysis
def metric_vector(sc: Scores, metric: str) -> np.ndarray | None:
    """Per-item scores (1 / ½ / 0) of one condition under ``metric``; None when not measured."""
    if metric == "greedy":
        return sc.greedy_correct if any(sc.greedy) or any(v != "other" for v in sc.greedy_verdict) else None
    return sc.correct_of(metric)


def analyze(result: ExperimentResult, seed: int = 0, level: float = 0.95, alpha: float = ALPHA) -> dict:
    """The report as JSON-ready dicts (see the module docstring for the decision rule).

    Per condition and metric: ``acc`` with its Wilson interval over pairs (``lo``, ``hi``) and
    cluster-bootstrap interval (``boot_lo``, ``boot_hi``); ``vs_baseline``: the difference, its
    cluster-bootstrap interval, McNemar's exact test on pairs (``p``) and its Holm-adjusted value
    (``p_holm``). Per spec, ``vs_controls``: :func:`engine.stats.null_position` of its change among
    its controls' changes, with ``p_t_holm``. Greedy rows carry ``valid_rate``.
    """
    from .stats import accuracy_summary, cluster_bootstrap_ci, holm, null_position, paired_sign_test

    clusters = pair_ids(result.items)
    conds, scores = result.conditions, result.scores
    base_i = next(i for i, c in enumerate(conds) if c.kind == "baseline")
    vectors = {m: [metric_vector(sc, m) for sc in scores] for m in REPORT_METRICS + ("token_sum",)}
    rows = []
    for i, (cond, sc) in enumerate(zip(conds, scores)):
        row = {"name": cond.name, "kind": cond.kind, "neurons": cond.n_neurons, "per_layer": cond.per_layer(),
               "seconds": sc.seconds, "mean_margin": float(np.nanmean(sc.margin))}
        for key in ("seed", "of", "mass_ratio"):
            if getattr(cond, key) is not None:
                row[key] = getattr(cond, key)
        for metric, vecs in vectors.items():
            x = vecs[i]
            if x is None:
                continue
            m = accuracy_summary(x, clusters, level, seed=seed)
            if metric == "greedy":
                m["valid_rate"] = float(np.mean(sc.greedy_valid))
            b = vecs[base_i]
            if i != base_i and b is not None:
                m["vs_baseline"] = {"diff": float(x.mean() - b.mean()),
                                    "ci": cluster_bootstrap_ci(x - b, clusters, level, seed=seed),
                                    **paired_sign_test(x, b, clusters)}
            row[metric] = m
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["kind"] not in STEERED_KINDS:
            continue
        ctrl = [c for c in rows if c["kind"] == "control" and c.get("of") == r["name"]]
        for metric in REPORT_METRICS:
            if metric in r and "vs_baseline" in r[metric]:
                null = [c[metric]["vs_baseline"]["diff"] for c in ctrl if metric in c and "vs_baseline" in c[metric]]
                if null:
                    r[metric]["vs_controls"] = null_position(r[metric]["vs_baseline"]["diff"], null)
    # Holm across the report's tests: each steered condition × metric, vs baseline and vs controls.
    family = []
    for r in rows:
        if r["kind"] in STEERED_KINDS:
            for metric in ("complete", "greedy"):
                m = r.get(metric)
                if m and "vs_baseline" in m:
                    family.append((m["vs_baseline"], "p", "p_holm"))
                if m and "vs_controls" in m:
                    family.append((m["vs_controls"], "p_t", "p_t_holm"))
    for (d, key, out), adj in zip(family, holm([d[key] for d, key, _ in family])):
        d[out] = adj
    summary = {"config": result.config, "n": len(result.items), "n_pairs": len(set(clusters)),
               "seconds": result.seconds, "conditions": rows, "alpha": alpha, "level": level}
    summary["controls"] = {}
    for name, r in by_name.items():
        ctrl = [c for c in rows if c["kind"] == "control" and c.get("of") == name]
        if ctrl:
            summary["controls"][name] = {
                metric: {"n": len(ctrl), "mean": float(np.mean([c[metric]["acc"] for c in ctrl])),
                         "min": float(min(c[metric]["acc"] for c in ctrl)),
                         "max": float(max(c[metric]["acc"] for c in ctrl)),
                         "mass_ratio": _mean_ratio(ctrl)}
                for metric in REPORT_METRICS if all(metric in c for c in ctrl)}
    for r in rows:
        if r["kind"] in STEERED_KINDS:
            r["verdict"] = classify(r, alpha)
    summary["verdict"] = verdict(summary)
    return summary


def _mean_ratio(ctrl: list[dict]) -> float | None:
    """The controls' mean activation-mass ratio (None when they were not mass-matched)."""
    ratios = [c["mass_ratio"] for c in ctrl if c.get("mass_ratio") is not None and np.isfinite(c["mass_ratio"])]
    return float(np.mean(ratios)) if ratios else None


def classify(row: dict, alpha: float = ALPHA) -> dict:
    """Per metric: ``specific`` / ``not specific`` / ``no change`` / ``not measured`` (module docstring)."""
    out = {}
    for metric in ("complete", "greedy"):
        m = row.get(metric)
        if not m or "vs_baseline" not in m:
            out[metric] = "not measured"
            continue
        if metric == "greedy" and m.get("valid_rate", 1.0) < VALID_MIN:
            out[metric] = "not measured"
            continue
        vb, vc = m["vs_baseline"], m.get("vs_controls")
        sig = vb.get("p_holm", vb["p"]) < alpha and vb["diff"] != 0
        if not sig:
            out[metric] = "no change"
        elif vc is None:
            out[metric] = "no controls"
        elif vc["beyond_all"] and vc.get("p_t_holm", vc["p_t"]) < alpha \
                and (vb["diff"] - vc["null_mean"]) * vb["diff"] > 0:
            out[metric] = "specific"
        else:
            out[metric] = "not specific"
    return out


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def verdict(summary: dict) -> str:
    """A plain-language reading of the report: both metrics, the controls, the caveats."""
    rows = summary["conditions"]
    base = next(r for r in rows if r["kind"] == "baseline")
    fc = base["complete"]
    parts = [f"Baseline: {fc['acc']:.1%} forced choice (complete answers, 95% CI {fc['lo']:.1%}–{fc['hi']:.1%}, "
             f"{summary['n_pairs']} pairs)"]
    if "greedy" in base:
        g = base["greedy"]
        parts[-1] += f", {g['acc']:.1%} greedy with {g['valid_rate']:.0%} valid answers"
    parts[-1] += "."
    if "greedy" in base and base["greedy"]["valid_rate"] < VALID_MIN:
        parts.append(f"Warning: only {base['greedy']['valid_rate']:.0%} of greedy replies name either answer, so "
                     "greedy accuracy is not a measurement here: give a reply stem that asks for the number or "
                     "more tokens.")
    steered = [r for r in rows if r["kind"] in STEERED_KINDS]
    if not steered:
        return " ".join(parts + ["No steering conditions."])
    for r in steered:
        m = r["complete"]
        vb = m["vs_baseline"]
        text = (f"{r['name']}: {_pp(vb['diff'])} forced choice (CI {_pp(vb['ci'][0])} to {_pp(vb['ci'][1])}, "
                f"McNemar on pairs p = {vb['p']:.2g}, Holm {vb.get('p_holm', vb['p']):.2g})")
        vc = m.get("vs_controls")
        if vc:
            text += (f"; its {vc['n']} random controls moved it {_pp(vc['null_mean'])} on average "
                     f"(5–95%: {_pp(vc['null_lo'])} to {_pp(vc['null_hi'])}), the concept sits at their "
                     f"{vc['percentile']:.0f}th percentile (empirical p = {vc['p_empirical']:.2g})")
        call = r["verdict"]["complete"]
        text += {"specific": " — a specific effect: beyond every random control of the same size.",
                 "not specific": " — it changes accuracy, but random neurons of the same size do as much: not "
                                 "shown to be specific to the concept.",
                 "no change": " — no significant change from the baseline.",
                 "no controls": " — significant against the baseline, but no random controls ran, so it is not "
                                "shown to be specific."}.get(call, ".")
        g = r.get("greedy")
        if g and "vs_baseline" in g:
            gcall = r["verdict"]["greedy"]
            text += f" Greedy: {_pp(g['vs_baseline']['diff'])} ({gcall}"
            text += f"; valid answers {g['valid_rate']:.0%})." if gcall != "not measured" else \
                f": only {g['valid_rate']:.0%} valid answers)."
        parts.append(text)
    parts.append("(Intervals: Wilson over pairs and a cluster bootstrap by pair; p-values: McNemar's exact test "
                 "on pairs and a t-based prediction test against the controls, Holm-corrected across this report.)")
    return " ".join(parts)


def to_json(obj, indent: int | None = None) -> str:
    """JSON text of a report (NumPy numbers and tuples made plain)."""
    import json

    def plain(x):
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.floating):
            return float(x)
        if isinstance(x, (tuple, set, np.ndarray)):
            return list(x)
        raise TypeError(type(x).__name__)

    return json.dumps(obj, ensure_ascii=False, indent=indent, default=plain)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def to_markdown(summary: dict, include_controls: bool = False) -> str:
    """The results as a Markdown table (random controls folded into their spec's row unless
    ``include_controls``), then the runtime and the verdict."""
    has_greedy = any("greedy" in r for r in summary["conditions"])
    head = ["condition", "neurons", "complete-answer acc % [95% CI]", "Δ vs base (pts)", "p (Holm)",
            "controls Δ 5–95% (pts)", "percentile among controls", "first-diff acc %"]
    if has_greedy:
        head += ["greedy acc % (valid %)", "greedy Δ (pts)"]
    head.append("verdict")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["conditions"]:
        if r["kind"] == "control" and not include_controls:
            continue
        m = r["complete"]
        vb, vc = m.get("vs_baseline"), m.get("vs_controls")
        cells = [r["name"], str(r["neurons"]), f"{_pct(m['acc'])} [{_pct(m['lo'])}, {_pct(m['hi'])}]",
                 f"{100 * vb['diff']:+.1f}" if vb else "", _p(vb.get("p_holm", vb["p"])) if vb else "",
                 f"{100 * vc['null_lo']:+.1f} to {100 * vc['null_hi']:+.1f}" if vc else "",
                 f"{vc['percentile']:.0f}" if vc else "", _pct(r.get("first_diff", {}).get("acc"))]
        if has_greedy:
            g = r.get("greedy")
            cells += [f"{_pct(g['acc'])} ({_pct(g['valid_rate'])})" if g else "–",
                      f"{100 * g['vs_baseline']['diff']:+.1f}" if g and "vs_baseline" in g else ""]
        cells.append(", ".join(f"{k}: {v}" for k, v in r["verdict"].items()) if "verdict" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    cfg = summary["config"]
    lines.append("")
    stem = "each format's own" if cfg.get("prefix", "") is None else repr(cfg.get("prefix", ""))
    greedy = (f"greedy ≤ {cfg['max_new_tokens']} tokens" if cfg.get("greedy", True) and cfg.get("max_new_tokens")
              else "no greedy replies")
    lines.append(f"n = {summary['n']} prompts ({summary['n_pairs']} pairs); model {cfg.get('model', '?')}; database "
                 f"{cfg.get('db', '–')}; seed {cfg.get('seed', '?')}; stem {stem}; {greedy}; "
                 f"total runtime {summary['seconds']:.0f} s.")
    lines.append("")
    lines.append(summary["verdict"])
    return "\n".join(lines)
