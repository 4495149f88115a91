"""The replication suite: one report on whether steering a concept fixes "9.8 vs 9.11", with its nulls.

Provides:

* :class:`Suite`: the design: question formats × prompt sets (pairs per cell, whole-number range),
  concepts and concept controls, random controls per concept, a held-out wording and range, a
  dose–response (top k) and strength sweep, and the scorer check;
* :func:`run_suite` → the report (JSON-ready dict): every cell analysed by
  :func:`engine.experiments.analyze`, the cells pooled (the headline numbers), the held-out cell,
  the dose curves and the scorer check;
* :func:`copy_items`: the scorer check ("Repeat this number exactly: 18.68" → "18.68" vs "18.6",
  and the reverse): a model that copies must score high, or the measurement is broken;
* :func:`report_markdown`, :func:`report_html` and the Altair charts :func:`effects_chart` and
  :func:`dose_chart`.

Pooling: the cells' items are concatenated (pairs stay the resampling unit) and each condition's
scores with them; control ``i`` of a concept is the ``i``-th matched random set in every cell (its
neurons are matched per format, on that format's prompts), so the pooled null is still a
distribution of random matched interventions.
"""

from __future__ import annotations

import dataclasses
import html
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import MonitorError
from .experiments import (DEFAULT_CONTROLS, ExperimentResult, analyze, build_conditions, run_experiment, to_json,
                          to_markdown)
from .prompt_sets import (DEFAULT_FORMATS, DEFAULT_SETS, DEFAULT_X_RANGE, FORMATS, HELDOUT_X_RANGE, Item,
                          decimal_pairs, format_items, sample_pairs)
from .scoring import DEFAULT_BATCH, DEFAULT_MAX_NEW_TOKENS, Scores

COPY_STEM = ""
RESULTS_KEY = "_results"  # the raw per-item scores of a run, saved beside the report (not in its JSON)


@dataclass
class Suite:
    """The design of one replication run (defaults: the suite the benchmark times)."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    sets: tuple[str, ...] = DEFAULT_SETS
    pairs: int = 25  # per (format, set) cell, each asked in both orders
    x_range: tuple[int, int] = DEFAULT_X_RANGE
    controls: int = DEFAULT_CONTROLS  # per concept
    seed: int = 0
    heldout: bool = True  # one more cell: the held-out wording on the held-out range
    heldout_set: str = "shorter"
    doses: tuple[int, ...] = ()  # top-k values for the dose–response (on the dose format's cells)
    strengths: tuple[float, ...] = ()  # replace strengths for the strength sweep (0 = suppress)
    dose_format: str = "chat"
    dose_controls: int | None = None  # controls per dose (default: ``controls``)
    copy_check: bool = True
    greedy: bool = True
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH
    mass_prompts: int = 16  # prompts per format on which activation mass is measured

    def check(self) -> None:
        from .prompt_sets import SETS

        bad = [f for f in self.formats if f not in FORMATS] + [s for s in self.sets if s not in SETS]
        if bad:
            raise MonitorError(f"Unknown format or set {', '.join(bad)}: formats {', '.join(FORMATS)}; sets "
                               f"{', '.join(SETS)}.")
        if not self.formats or not self.sets:
            raise MonitorError("The suite needs at least one format and one set.")
        if self.pairs < 1 or self.controls < 0:
            raise MonitorError("--pairs must be at least 1 and --controls at least 0.")
        if any(k < 1 for k in self.doses):
            raise MonitorError("Every --k dose must be at least 1.")

    @property
    def n_cells(self) -> int:
        return len(self.formats) * len(self.sets) + int(self.heldout)


def copy_items(n_pairs: int = 25, seed: int = 0) -> list[Item]:
    """``n_pairs`` copy questions in both directions: "Repeat this number exactly: X.YZ" with answers
    X.YZ vs X.Y (the wrong one a prefix) and "… X.Y" with X.Y vs X.YZ (the right one a prefix)."""
    rng = random.Random(seed)
    items = []
    for p in range(n_pairs):
        x, y, z = rng.randint(10, 99), rng.randint(1, 9), rng.randint(1, 9)
        long, short = f"{x}.{y}{z}", f"{x}.{y}"
        correct, wrong = (long, short) if p % 2 == 0 else (short, long)
        items.append(Item(f"Repeat this number exactly: {correct}", correct, wrong, p))
    return items


def concat(results: Sequence[ExperimentResult], config: dict) -> ExperimentResult:
    """One result from cells with the same conditions: items and scores concatenated, pair ids
    kept apart per cell."""
    items, offset = [], 0
    for r in results:
        ids = [it.pair if it.pair is not None else 10**6 + i for i, it in enumerate(r.items)]
        items += [dataclasses.replace(it, pair=offset + pid) for it, pid in zip(r.items, ids)]
        offset += max(ids) + 1
    names = [c.name for c in results[0].conditions]
    if any([c.name for c in r.conditions] != names for r in results):
        raise ValueError("cells must share their conditions to be pooled")
    scores = []
    for j in range(len(names)):
        parts = [r.scores[j] for r in results]
        scores.append(Scores(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("complete", "first_diff", "token_sum")),
                             [g for p in parts for g in p.greedy], [v for p in parts for v in p.greedy_verdict],
                             sum(p.seconds for p in parts)))
    return ExperimentResult(items, list(results[0].conditions), scores, config, sum(r.seconds for r in results))


def dose_selections(selections, doses: Sequence[int], strengths: Sequence[float]):
    """Truncated (top-k is a prefix of the similarity ranking) and re-strengthened variants."""
    from .specs import ConceptSpec, Selection

    out = []
    for s in selections:
        for k in doses:
            if k == s.spec.k or s.spec.neurons is not None or k > len(s.neurons):
                continue
            spec = dataclasses.replace(s.spec, k=int(k))
            out.append(Selection(spec, s.neurons[:k], s.similarity[:k], s.summaries[:k]))
        for st in strengths:
            if float(st) == float(s.spec.strength):
                continue
            kw = dict(mode="suppress", strength=None) if float(st) == 0 else dict(mode="strengthen", strength=float(st))
            spec = ConceptSpec(**{**{f.name: getattr(s.spec, f.name) for f in dataclasses.fields(s.spec)}, **kw})
            out.append(Selection(spec, list(s.neurons), list(s.similarity), list(s.summaries)))
    return out


def run_suite(lm, selections, suite: Suite | None = None, concept_controls=(), quantiles=None, view=None,
              config: dict | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run the suite (module docstring) and return the report.

    ``selections``: the concepts (resolved specs); ``concept_controls``: other concepts at the same
    k, reported beside them; ``view`` (an :class:`~engine.activation_view.ActivationView`) makes
    the control matching use quantile-normalised activation mass. ``progress(stage, done, total)``
    counts scored item-conditions.
    """
    from .controls import activation_mass

    suite = suite or Suite()
    suite.check()
    t0 = time.perf_counter()
    cells = [(f, s, suite.x_range, suite.pairs) for f in suite.formats for s in suite.sets]
    if suite.heldout:
        cells.append(("heldout", suite.heldout_set, HELDOUT_X_RANGE, suite.pairs))
    cell_items = []
    for i, (fmt, kind, xr, n) in enumerate(cells):
        pairs = sample_pairs(decimal_pairs(kind, xr, dates=True), n, suite.seed + 17 * i)
        cell_items.append(format_items(pairs, fmt))
    per_cell = 1 + len(selections) * (1 + suite.controls) + (len(selections) > 1) + len(concept_controls)
    total = sum(len(it) for it in cell_items) * per_cell
    done = [0]

    def tick(stage):
        def inner(name, k, of, last={}):
            key = (stage, name)
            done[0] += k - last.get(key, 0)
            last[key] = k
            if progress is not None:
                progress(f"{stage}: {name}", done[0], total)
        return inner

    config = {"seed": suite.seed, "greedy": suite.greedy,
              "max_new_tokens": suite.max_new_tokens if suite.greedy else 0, **(config or {})}
    masses: dict[str, np.ndarray] = {}
    results = []
    for (fmt, kind, xr, _), items in zip(cells, cell_items):
        if fmt not in masses:
            pool = [it for (f, *_), its in zip(cells, cell_items) if f == fmt for it in its]
            sample = random.Random(suite.seed).sample(pool, min(suite.mass_prompts, len(pool)))
            masses[fmt] = activation_mass(lm, [it.chat() for it in sample], view)
        conds = build_conditions(selections, lm.n_neurons, suite.controls, suite.seed, masses[fmt], concept_controls)
        cfg = {"format": fmt, "set": kind, "x_range": list(xr), **(config or {})}
        res = run_experiment(lm, items, conds, quantiles, FORMATS[fmt].stem, suite.greedy, suite.max_new_tokens,
                             suite.batch_size, cfg, tick(f"{fmt}/{kind}"))
        results.append(res)
    cell_reports = []
    for (fmt, kind, xr, n), res in zip(cells, results):
        summary = analyze(res, seed=suite.seed)
        cell_reports.append({"format": fmt, "set": kind, "x_range": list(xr), "pairs": n, "heldout": fmt == "heldout",
                             "stem": FORMATS[fmt].stem, "summary": summary})
    main = [r for (fmt, *_), r in zip(cells, results) if fmt != "heldout"]
    pooled = analyze(concat(main, {"pooled": True, "prefix": None, **config}), seed=suite.seed)
    report = {"suite": dataclasses.asdict(suite), "config": dict(config or {}), "cells": cell_reports,
              "pooled": pooled, "conditions_per_cell": per_cell}
    if suite.doses or suite.strengths:
        dose_cells = [r for (fmt, *_), r in zip(cells, results) if fmt == suite.dose_format]
        if not dose_cells:
            raise MonitorError(f"The dose format {suite.dose_format!r} is not among the suite's formats.")
        base = analyze(concat(dose_cells, {"doses": True}), seed=suite.seed)
        report["doses"] = _run_doses(lm, selections, suite, cells, cell_items, masses, quantiles, config, base)
    if suite.copy_check:
        report["copy_check"] = copy_check(lm, suite)
    report["seconds"] = time.perf_counter() - t0
    report["verdict"] = suite_verdict(report)
    report[RESULTS_KEY] = {"cells": results, "heldout_last": suite.heldout}
    return report


def _run_doses(lm, selections, suite: Suite, cells, cell_items, masses, quantiles, config, base: dict) -> dict:
    """The dose–response and strength sweep on the dose format's cells; each variant gets its own
    matched controls; the base dose's point comes from the main cells (``base``, already analysed)."""
    variants = dose_selections(selections, suite.doses, suite.strengths)
    if not variants:
        return {"points": []}
    n_ctrl = suite.controls if suite.dose_controls is None else suite.dose_controls
    results = []
    for (fmt, kind, xr, _), items in zip(cells, cell_items):
        if fmt != suite.dose_format:
            continue
        conds = build_conditions(variants, lm.n_neurons, n_ctrl, suite.seed + 7, masses[fmt])
        results.append(run_experiment(lm, items, conds, quantiles, FORMATS[fmt].stem, False, 0, suite.batch_size,
                                      {"format": fmt, "set": kind, **(config or {})}))
    summary = analyze(concat(results, {"doses": True}), seed=suite.seed)
    points = []
    for sel in list(selections) + variants:
        row = next((r for src in (summary, base) for r in src["conditions"] if r["name"] == sel.spec.label), None)
        if row is None:
            continue
        m = row["complete"]
        vc = m.get("vs_controls", {})
        points.append({"concept": sel.spec.concept, "mode": sel.spec.mode, "k": sel.spec.k,
                       "strength": sel.spec.strength, "diff": m["vs_baseline"]["diff"],
                       "ci": m["vs_baseline"]["ci"], "null_lo": vc.get("null_lo"), "null_hi": vc.get("null_hi"),
                       "null_mean": vc.get("null_mean"), "percentile": vc.get("percentile")})
    return {"format": suite.dose_format, "controls": n_ctrl, "points": points, "summary": summary}


def copy_check(lm, suite: Suite) -> dict:
    """The scorer check (:func:`copy_items`): baseline accuracy under each forced-choice metric."""
    from .experiments import Condition

    items = copy_items(suite.pairs, suite.seed)
    res = run_experiment(lm, items, [Condition("baseline", "baseline")], None, COPY_STEM, suite.greedy,
                         suite.max_new_tokens, suite.batch_size, {"copy_check": True})
    sc = res.scores[0]
    out = {"n": len(items), "prompt": "Repeat this number exactly: X", "stem": COPY_STEM}
    for metric in ("complete", "first_diff", "token_sum"):
        out[metric] = float(np.mean(sc.correct_of(metric)))
    if suite.greedy:
        out["greedy"] = float(np.mean(sc.greedy_correct))
    return out


# --------------------------------------------------------------------------- reading the report
def effect_rows(report: dict) -> list[dict]:
    """One row per (cell or pooled, concept): its change, interval, control band and call."""
    rows = []
    blocks = [(c["format"], c["set"], c["summary"]) for c in report["cells"]] + [("pooled", "all", report["pooled"])]
    for fmt, kind, summary in blocks:
        base = next(r for r in summary["conditions"] if r["kind"] == "baseline")
        for r in summary["conditions"]:
            if r["kind"] not in ("spec", "union", "concept-control"):
                continue
            m = r["complete"]
            vc = m.get("vs_controls") or {}
            g = r.get("greedy") or {}
            rows.append({
                "cell": "pooled" if fmt == "pooled" else f"{fmt}/{kind}", "format": fmt, "set": kind,
                "condition": r["name"], "kind": r["kind"], "baseline": base["complete"]["acc"], "acc": m["acc"],
                "diff": m["vs_baseline"]["diff"], "ci_lo": m["vs_baseline"]["ci"][0], "ci_hi": m["vs_baseline"]["ci"][1],
                "p_holm": m["vs_baseline"].get("p_holm"), "null_lo": vc.get("null_lo"), "null_hi": vc.get("null_hi"),
                "null_mean": vc.get("null_mean"), "percentile": vc.get("percentile"),
                "p_empirical": vc.get("p_empirical"), "greedy_diff": (g.get("vs_baseline") or {}).get("diff"),
                "greedy_valid": g.get("valid_rate"), "call": r.get("verdict", {}).get("complete"),
                "greedy_call": r.get("verdict", {}).get("greedy"),
            })
    return rows


def suite_verdict(report: dict) -> str:
    """What holds and what does not, in a few sentences."""
    rows = effect_rows(report)
    pooled = [r for r in rows if r["cell"] == "pooled"]
    base = next(r for r in report["pooled"]["conditions"] if r["kind"] == "baseline")["complete"]
    parts = [f"Pooled over {len(report['cells']) - sum(c['heldout'] for c in report['cells'])} cells "
             f"({report['pooled']['n_pairs']} pairs), the baseline scores {base['acc']:.1%} (complete-answer forced "
             "choice)."]
    for r in pooled:
        band = "" if r["null_lo"] is None else (f"; random controls {100 * r['null_lo']:+.1f} to "
                                                 f"{100 * r['null_hi']:+.1f} pts (5–95%), percentile {r['percentile']:.0f}")
        parts.append(f"{r['condition']}: {100 * r['diff']:+.1f} pts ({r['call']}{band}).")
    specific = [r for r in rows if r["call"] == "specific" and r["kind"] == "spec"]
    cells = [r for r in rows if r["cell"] != "pooled" and r["kind"] == "spec"]
    parts.append(f"Across the {len(cells)} concept × cell results, {len(specific)} are beyond their random null"
                 + (": " + ", ".join(f"{r['condition']} in {r['cell']}" for r in specific) if specific else "") + ".")
    held = [r for r in rows if r["format"] == "heldout" and r["kind"] == "spec"]
    if held:
        parts.append("Held-out wording and range: " + "; ".join(f"{r['condition']} {100 * r['diff']:+.1f} pts "
                                                                f"({r['call']})" for r in held) + ".")
    cc = report.get("copy_check")
    if cc:
        ok = cc["complete"] >= 0.9
        parts.append(f"Scorer check (copy a number): complete answers {cc['complete']:.0%}, first differing token "
                     f"{cc['first_diff']:.0%}, length-biased token sum {cc['token_sum']:.0%}"
                     + (" — the scorer sees a model that plainly knows the answer." if ok else
                        " — WARNING: the complete-answer scorer fails a task the model can do; distrust this report."))
    return " ".join(parts)


def effects_chart(report: dict):
    """Per cell and concept: the change in accuracy (dot, 95% CI) against its random controls'
    5–95% band (grey bar); dashed zero line."""
    import altair as alt
    import pandas as pd

    d = pd.DataFrame([r for r in effect_rows(report) if r["kind"] != "union"])
    d["label"] = d["condition"].str.slice(0, 40)
    order = [c["format"] + "/" + c["set"] for c in report["cells"]] + ["pooled"]
    y = alt.Y("cell:N", sort=order, title=None)
    base = alt.Chart()
    band = base.mark_bar(color="#bbbbbb", opacity=0.6, height=10).encode(
        y=y, x=alt.X("null_lo:Q", title="change in accuracy (complete-answer forced choice)", axis=alt.Axis(format="+%")),
        x2="null_hi:Q")
    ci = base.mark_rule(strokeWidth=2).encode(y=y, x="ci_lo:Q", x2="ci_hi:Q", color=alt.Color("label:N", title="concept"))
    dot = base.mark_point(filled=True, size=60).encode(
        y=y, x="diff:Q", color="label:N",
        tooltip=["cell", "condition", alt.Tooltip("diff:Q", format="+.1%"), alt.Tooltip("percentile:Q", format=".0f"),
                 "call"])
    zero = base.mark_rule(strokeDash=[4, 3], color="#666").encode(x=alt.datum(0.0))
    return (alt.layer(band, ci, dot, zero, data=d).facet(row=alt.Row("label:N", title=None))
            .properties(title="Concept steering vs its random null, per cell"))


def dose_chart(report: dict):
    """Dose–response: change in accuracy against top k (log scale), one line per concept, with
    its controls' 5–95% band."""
    import altair as alt
    import pandas as pd

    pts = (report.get("doses") or {}).get("points") or []
    d = pd.DataFrame([p for p in pts if p["mode"] == "suppress"])
    if d.empty:
        return None
    x = alt.X("k:Q", scale=alt.Scale(type="log"), title="neurons suppressed (top k)")
    band = alt.Chart(d).mark_area(opacity=0.25).encode(x=x, y=alt.Y("null_lo:Q", axis=alt.Axis(format="+%"),
                                                                      title="change in accuracy"),
                                                        y2="null_hi:Q", color=alt.Color("concept:N"))
    line = alt.Chart(d).mark_line(point=True).encode(x=x, y="diff:Q", color="concept:N",
                                                     tooltip=["concept", "k", alt.Tooltip("diff:Q", format="+.1%"),
                                                              alt.Tooltip("percentile:Q", format=".0f")])
    return alt.layer(band, line).properties(title="Dose–response with the random-control band", width=420, height=260)


def report_markdown(report: dict, charts: dict[str, str] | None = None) -> str:
    """The report as Markdown: verdict, pooled table, per-cell tables, held-out cell, doses, check.
    ``charts`` maps a title to an image path to embed."""
    s = report["suite"]
    lines = ["# Steering replication report: \"Which is bigger?\"", "",
             f"Model `{report['config'].get('model', '?')}`, database `{report['config'].get('db', '–')}`; "
             f"formats {', '.join(s['formats'])}; sets {', '.join(s['sets'])} (whole parts {s['x_range'][0]}–"
             f"{s['x_range'][1]}); {s['pairs']} pairs per cell in both orders; {s['controls']} random controls per "
             f"concept, matched on layers and activation mass; seed {s['seed']}; {report['seconds']:.0f} s.", "",
             "## Verdict", "", report["verdict"], ""]
    for title, path in (charts or {}).items():
        lines += [f"![{title}]({path})", ""]
    lines += ["## Pooled over the cells", "", to_markdown(report["pooled"]), ""]
    lines += ["## Every cell", "", "| cell | concept | baseline % | Δ pts [95% CI] | controls 5–95% (pts) | "
              "percentile | call | greedy Δ (valid %) |", "|---|---|---|---|---|---|---|---|"]
    for r in effect_rows(report):
        if r["cell"] == "pooled":
            continue
        band = "" if r["null_lo"] is None else f"{100 * r['null_lo']:+.1f} to {100 * r['null_hi']:+.1f}"
        pct = "" if r["percentile"] is None else f"{r['percentile']:.0f}"
        greedy = "" if r["greedy_diff"] is None else f"{100 * r['greedy_diff']:+.1f} ({100 * r['greedy_valid']:.0f})"
        lines.append(f"| {r['cell']}{' (held out)' if r['format'] == 'heldout' else ''} | {r['condition']} | "
                     f"{100 * r['baseline']:.1f} | {100 * r['diff']:+.1f} [{100 * r['ci_lo']:+.1f}, {100 * r['ci_hi']:+.1f}] "
                     f"| {band} | {pct} | {r['call']} | {greedy} |")
    if report.get("doses"):
        lines += ["", "## Dose–response and strength", "", "| concept | mode | k | strength | Δ pts [95% CI] | "
                  "controls 5–95% | percentile |", "|---|---|---|---|---|---|---|"]
        for p in report["doses"]["points"]:
            band = "" if p["null_lo"] is None else f"{100 * p['null_lo']:+.1f} to {100 * p['null_hi']:+.1f}"
            lines.append(f"| {p['concept']} | {p['mode']} | {p['k']} | {p['strength']:g} | {100 * p['diff']:+.1f} "
                         f"[{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}] | {band} | "
                         f"{'' if p['percentile'] is None else round(p['percentile'])} |")
    cc = report.get("copy_check")
    if cc:
        lines += ["", "## Scorer check", "", f"\"{cc['prompt']}\" ({cc['n']} prompts, half the wrong answers a prefix "
                  f"of the right one, half the reverse): complete answers {cc['complete']:.0%}, first differing token "
                  f"{cc['first_diff']:.0%}, token sum without a boundary {cc['token_sum']:.0%}"
                  + (f", greedy {cc['greedy']:.0%}" if "greedy" in cc else "") + "."]
    lines += ["", "## How to read this", "",
              "- **Complete-answer forced choice** compares log p(answer, then a token that ends it) of the two "
              "answers: length-neutral, and a prefix answer does not collect its continuations. **First differing "
              "token** compares the two answers at the first token where they differ.",
              "- **Controls**: per concept and cell, random neuron sets with the same number of neurons per layer, "
              "matched on activation mass on the steered tokens. A concept's effect is specific only if it is "
              "significant against the baseline (McNemar's exact test on pairs, Holm-corrected), beyond every control "
              "and significant against the controls' spread (t-based prediction test, Holm-corrected).",
              "- **Intervals**: Wilson over pairs (never collapses at 0 or 100%) and a cluster bootstrap by pair."]
    return "\n".join(lines) + "\n"


def chart_svgs(report: dict) -> dict[str, str]:
    """The report's charts as SVG text (rendered offline by vl-convert)."""
    import vl_convert as vlc

    out = {}
    for title, chart in (("Effects per cell", effects_chart(report)), ("Dose–response", dose_chart(report))):
        if chart is not None:
            out[title] = vlc.vegalite_to_svg(chart.to_json())
    return out


def report_html(report: dict) -> str:
    """A self-contained HTML page: the Markdown report's tables and text, charts as inline SVG."""
    body = _markdown_to_html(report_markdown(report))
    svgs = "".join(f"<h3>{html.escape(t)}</h3>{svg}" for t, svg in chart_svgs(report).items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Steering replication report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
            "th{background:#f3f3f3}code{background:#f5f5f5;padding:0 3px}</style></head><body>"
            + body.replace("<h2>Pooled", svgs + "<h2>Pooled", 1) + "</body></html>")


def _markdown_to_html(md: str) -> str:
    """Just enough Markdown (headings, tables, bullets, paragraphs, `code`, **bold**) for the report."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)

    out, table, bullets = [], [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-|\s]+\|", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
                       + "</table>")
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            bullets.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


def save_report(report: dict, out_dir, html_page: bool = True) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` (with SVG charts beside it), ``scores.pkl`` (the raw
    per-item scores, when the report carries them) and, optionally, ``report.html`` into ``out_dir``;
    returns the paths written."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    raw = report.get(RESULTS_KEY)
    report = {k: v for k, v in report.items() if k != RESULTS_KEY}
    paths["json"].write_text(to_json(report, indent=1), encoding="utf-8")
    if raw is not None:  # every condition's per-item scores, to re-analyse without re-scoring
        import pickle

        paths["scores"] = out / "scores.pkl"
        with open(paths["scores"], "wb") as fh:
            pickle.dump(raw, fh)
    charts = {}
    for i, (title, svg) in enumerate(chart_svgs(report).items()):
        p = out / f"chart-{i + 1}.svg"
        p.write_text(svg, encoding="utf-8")
        charts[title] = p.name
        paths[f"chart{i + 1}"] = p
    paths["markdown"].write_text(report_markdown(report, charts), encoding="utf-8")
    if html_page:
        paths["html"] = out / "report.html"
        paths["html"].write_text(report_html(report), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}
