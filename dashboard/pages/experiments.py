"""Steering experiments: does steering a concept change accuracy more than random neurons do?

Two tabs:

* **Run an experiment**: prompts from a generated "which is bigger" set (set, wording, range of
  whole numbers) or a custom JSON-lines file; the session's steering specs plus typed ones;
  concept controls; random controls per spec matched on layers and activation mass
  (:func:`engine.experiments.build_conditions`). Each prompt is scored by complete-answer forced
  choice (length-neutral), the first differing token and, optionally, the greedy reply; the
  report (:func:`engine.experiments.analyze`) gives Wilson intervals over pairs, McNemar's exact
  test on pairs, where each spec's change falls among its controls' changes, Holm's correction
  and a verdict. Charts: accuracy per condition; each spec's change against its null.
* **Replication report**: a report written by ``python -m engine experiment replicate``
  (formats × sets × concepts, held-out wording and range, scorer check), read from
  ``data/reports/`` or uploaded, with the same charts as its HTML page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import hosted, resources, steering_specs, widgets
from engine import experiments as ex
from engine import prompt_sets, replication, scoring
from engine.errors import MonitorError
from engine.specs import ConceptSpec, specs_from_json

DEFAULT_PAIRS = 20
MAX_N = 100_000
DEFAULT_CONTROLS = 20
MAX_CONTROLS = 100
# Measured with the embedded model on 2 CPU cores: seconds per scored prompt × condition (idle, busy).
SECONDS_PER_SCORE = {False: (0.05, 0.5), True: (0.15, 1.5)}
METRICS = {"complete": "forced choice: complete answers", "first_diff": "forced choice: first differing token",
           "greedy": "greedy reply"}
KIND_COLOURS = {"baseline": "#9e9e9e", "spec": "#d6604d", "union": "#b2182b", "concept-control": "#7b3294",
                "control": "#4393c3"}
CUSTOM_EXAMPLE = '{"prompt": "Which is bigger: 9.8 or 9.11?", "correct": "9.8", "wrong": "9.11", "pair": 1}'
REPLICATE_COMMAND = "python -m engine experiment replicate --model embedded --html"


def items_from_text(text: str, name: str) -> list:
    """Items from JSON-lines text (:func:`engine.prompt_sets.parse_items`), errors naming ``name``."""
    return prompt_sets.parse_items(text, name)


def parse_typed_specs(text: str) -> list[ConceptSpec]:
    """Specs typed one per line (``Bible verses:suppress:500``), or a JSON list as exported."""
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith(("[", "{")):
        return specs_from_json(text)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(ConceptSpec.parse(line))
            except MonitorError as err:
                raise MonitorError(f"Spec line {i}: {err}") from err
    return out


def results_table(summary: dict, metric: str, include_controls: bool = True) -> pd.DataFrame:
    """One row per condition: accuracy with its Wilson interval over pairs, the change from the
    baseline with McNemar's exact test on pairs (Holm-adjusted), and, per spec, its controls."""
    rows = []
    for r in summary["conditions"]:
        m = r.get(metric)
        if m is None or (r["kind"] == "control" and not include_controls):
            continue
        vb, vc = m.get("vs_baseline") or {}, m.get("vs_controls") or {}
        rows.append({
            "condition": r["name"], "kind": r["kind"], "neurons": r["neurons"], "accuracy": m["acc"],
            "95% CI low": m["lo"], "95% CI high": m["hi"], "Δ vs baseline": vb.get("diff"),
            "Δ CI": _ci(vb.get("ci")), "McNemar p (pairs)": vb.get("p"), "p (Holm)": vb.get("p_holm"),
            "controls Δ 5%": vc.get("null_lo"), "controls Δ 95%": vc.get("null_hi"),
            "percentile among controls": vc.get("percentile"), "empirical p": vc.get("p_empirical"),
            "valid answers": m.get("valid_rate"), "verdict": (r.get("verdict") or {}).get(
                "greedy" if metric == "greedy" else "complete"),
            "mass ratio": r.get("mass_ratio"), "seconds": r["seconds"],
        })
    return pd.DataFrame(rows)


def _ci(ci) -> str | None:
    if not ci:
        return None
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] pts"


def accuracy_chart(summary: dict, metric: str) -> alt.LayerChart:
    """Accuracy per condition other than the random controls (one horizontal bar each) with its 95%
    Wilson interval over pairs; chance (50%) dashed."""
    d = results_table(summary, metric, include_controls=False)[["condition", "kind", "neurons", "accuracy",
                                                               "95% CI low", "95% CI high"]]
    d = d.rename(columns={"95% CI low": "lo", "95% CI high": "hi"})
    order = list(d["condition"])
    kinds = [k for k in KIND_COLOURS if k in set(d["kind"])]
    y = alt.Y("condition:N", sort=order, title=None, axis=alt.Axis(labelLimit=300, labelOverlap=False))
    tooltip = [alt.Tooltip("condition:N"), alt.Tooltip("neurons:Q"), alt.Tooltip("accuracy:Q", format=".1%"),
               alt.Tooltip("lo:Q", format=".1%", title="95% CI low"), alt.Tooltip("hi:Q", format=".1%", title="95% CI high")]
    bars = alt.Chart(d).mark_bar(opacity=0.85).encode(
        y=y, x=alt.X("accuracy:Q", title=f"{METRICS[metric]} accuracy (95% Wilson CI over pairs)",
                     scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.Color("kind:N", title="condition", scale=alt.Scale(domain=kinds, range=[KIND_COLOURS[k] for k in kinds])),
        tooltip=tooltip)
    errors = alt.Chart(d).mark_errorbar(ticks=True, color="#777", thickness=1.5).encode(
        y=y, x=alt.X("lo:Q", title=None), x2="hi:Q", tooltip=tooltip)
    chance = alt.Chart(pd.DataFrame({"x": [0.5]})).mark_rule(strokeDash=[4, 3], color="#888").encode(x="x:Q")
    return alt.layer(bars, errors, chance).properties(height=alt.Step(34), description="exp_chart")


def null_chart(summary: dict, metric: str) -> alt.LayerChart | None:
    """Per spec: every random control's change in accuracy (grey ticks) and the spec's own (red)."""
    rows = summary["conditions"]
    pts = []
    for r in rows:
        m = r.get(metric)
        if r["kind"] == "control" and m and "vs_baseline" in m:
            pts.append({"spec": r["of"], "what": "random control", "change": m["vs_baseline"]["diff"], "name": r["name"]})
        elif r["kind"] in ("spec", "union", "concept-control") and m and "vs_controls" in m:
            pts.append({"spec": r["name"], "what": "the concept", "change": m["vs_baseline"]["diff"], "name": r["name"]})
    if not any(p["what"] == "the concept" for p in pts):
        return None
    d = pd.DataFrame(pts)
    ticks = alt.Chart(d).mark_tick(thickness=2, size=18).encode(
        x=alt.X("change:Q", title=f"change in {METRICS[metric]} accuracy vs the baseline", axis=alt.Axis(format="+%")),
        y=alt.Y("spec:N", title=None, axis=alt.Axis(labelLimit=260)),
        color=alt.Color("what:N", title=None, scale=alt.Scale(domain=["random control", "the concept"],
                                                               range=["#9e9e9e", "#d6604d"])),
        tooltip=["name:N", alt.Tooltip("change:Q", format="+.1%")])
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(strokeDash=[4, 3], color="#666").encode(x="x:Q")
    return alt.layer(ticks, zero).properties(height=alt.Step(40), description="exp_null_chart")


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def honest_note(summary: dict) -> str:
    """What the controls and the sample allow us to say, beyond the engine's verdict."""
    has_steer = any(r["kind"] in ex.STEERED_KINDS for r in summary["conditions"])
    n_ctrl = sum(r["kind"] == "control" for r in summary["conditions"])
    if not has_steer:
        return "Only the baseline ran: add a steering spec to test a concept."
    text = ""
    if n_ctrl == 0:
        text = ("No random control ran, so a change cannot be credited to the concept: steering that many neurons "
                "anywhere might do the same. ")
    elif n_ctrl < 20 * sum(r["kind"] == "spec" for r in summary["conditions"]):
        text = (f"Only {n_ctrl} random controls: a null distribution needs about 20 per concept before a percentile "
                "means much. ")
    n = summary["n_pairs"]
    return text + (f"With {n} pairs the 95% intervals are about ±{100 / math.sqrt(max(n, 1)):.0f} points wide. The "
                   "reported effect was fragile in a replication (prompt format, steered tokens): check it on another "
                   "set and wording, or read the replication report.")


def list_reports() -> list[Path]:
    """``report.json`` files under ``data/reports/``, newest first."""
    from engine.loader import data_dir

    root = data_dir() / "reports"
    return sorted(root.glob("*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True) if root.exists() else []


# --------------------------------------------------------------------------- the page
steering_specs.restore_from_url()
st.title("Steering experiments")
st.caption("Does steering a concept change accuracy more than steering as many random neurons? Each prompt is scored "
           "under the baseline, each spec, concept controls and random controls (same neurons per layer, matched on "
           "activation mass). Forced choice compares the two complete answers (each followed by a token that ends "
           "it), so neither length nor a shared prefix decides; greedy reads the first number of the reply.")

tab_run, tab_report = st.tabs(["Run an experiment", "Replication report"])


def _run_tab() -> None:
    res = resources.resources()
    if res.browse_only:
        st.info(f"{res.browse_only} Experiments need the model, so they cannot run.")
        return
    if res.model.error:
        st.error(f"The model could not be loaded, so experiments cannot run: {res.model.error}")
        return
    lm = res.lm
    which = st.radio("Prompts", ["decimals", "custom"], horizontal=True, key=widgets.widget_key("exp_which", "decimals"),
                     format_func={"decimals": "Generated decimals (which is bigger?)",
                                  "custom": "Custom (JSON lines of prompt, correct, wrong)"}.get)
    widgets.remember("exp_which")
    items_error, all_items, stem, what, pairs, fmt = None, [], "", {}, [], None
    if which == "decimals":
        c1, c2, c3 = st.columns(3)
        set_name = c1.selectbox("Set", list(prompt_sets.SETS), key=widgets.widget_key("exp_set", "shorter"),
                                help="; ".join(f"{k}: {v}" for k, v in prompt_sets.SETS.items()))
        widgets.remember("exp_set")
        fmt_name = c2.selectbox("Wording", list(prompt_sets.FORMATS), key=widgets.widget_key("exp_format", "chat"),
                                format_func=lambda f: f"{f}: {prompt_sets.FORMATS[f].description}")
        widgets.remember("exp_format")
        x_lo, x_hi = c3.slider("Whole parts", 0, 99, key=widgets.widget_key("exp_xrange", prompt_sets.DEFAULT_X_RANGE),
                               help="13 and up: no number reads as a month.day date.")
        widgets.remember("exp_xrange")
        fmt = prompt_sets.FORMATS[fmt_name]
        c4, c5 = st.columns(2)
        template = c4.text_input("Your own wording (optional)", key=widgets.widget_key("exp_template", ""),
                                 placeholder=fmt.template, help="Must contain {a} and {b}; empty: the wording above.")
        widgets.remember("exp_template")
        stem = c5.text_input("Reply stem", key=widgets.widget_key(f"exp_stem_{fmt_name}", fmt.stem),
                             help="The assistant reply starts with this before the answer is scored.")
        widgets.remember(f"exp_stem_{fmt_name}")
        try:
            if template.strip():
                fmt = prompt_sets.Format("custom", template, fmt.stem, "your wording")
            pairs = prompt_sets.decimal_pairs(set_name, (x_lo, x_hi))
            prompt_sets.format_items(pairs[:1], fmt)  # a bad wording fails here, before the run
            all_items = pairs  # sampled by pair, each then asked in both orders
            what = {"set": set_name, "format": fmt.name, "template": fmt.template, "x_range": [x_lo, x_hi]}
        except MonitorError as err:
            items_error = str(err)
    else:
        up = st.file_uploader("Prompt file (.jsonl)", type=["jsonl", "json", "txt"], key="exp_upload",
                              help="One JSON object per line: " + CUSTOM_EXAMPLE)
        st.text_area("…or paste JSON lines", key=widgets.widget_key("exp_paste", ""), height=110,
                     placeholder=CUSTOM_EXAMPLE)
        pasted = widgets.remember("exp_paste") or ""
        stem = st.text_input("Reply stem", key=widgets.widget_key("exp_custom_stem", ""),
                             help="Optional text the assistant reply starts with before the answer.")
        widgets.remember("exp_custom_stem")
        try:
            if up is not None:
                all_items = items_from_text(up.getvalue().decode("utf-8", errors="replace"), up.name)
            elif pasted.strip():
                all_items = items_from_text(pasted, "the pasted prompts")
            else:
                items_error = "Upload a .jsonl file or paste JSON lines: " + CUSTOM_EXAMPLE
        except MonitorError as err:
            items_error = str(err)
    if items_error:
        (st.info if which == "custom" and "Upload a .jsonl" in items_error else st.error)(items_error)

    st.subheader("Steering")
    session_specs = steering_specs.current_specs(enabled_only=True)
    use_session = st.checkbox(f"Use this session's enabled steering specs ({len(session_specs)})",
                              key=widgets.widget_key("exp_use_session", True), disabled=not session_specs,
                              help="Specs added on the chat or Steering page (or restored from a ?steer= link).")
    widgets.remember("exp_use_session")
    if session_specs:
        st.caption("Session specs: " + "; ".join(s.label for s in session_specs))
    s1, s2 = st.columns(2)
    s1.text_area("More specs, one per line", key=widgets.widget_key("exp_specs", ""), height=80,
                 placeholder="Bible verses:suppress:500\ndates:suppress:500\nlove:strengthen:50:strength=1.0",
                 help="concept[:mode[:k[:key=value…]]], keys strength, layers (lo-hi), min_score, keyword, polarity, "
                      "tokens; or a JSON list as exported by the steering panel.")
    typed = widgets.remember("exp_specs") or ""
    s2.text_area("Concept controls, one per line", key=widgets.widget_key("exp_concept_controls", ""), height=80,
                 placeholder="decimal numbers:suppress:500",
                 help="Other concepts at the same k, reported beside the specs (no random controls of their own).")
    typed_ctrl = widgets.remember("exp_concept_controls") or ""
    spec_error = None
    try:
        specs = (list(session_specs) if use_session and session_specs else []) + parse_typed_specs(typed)
        ctrl_specs = parse_typed_specs(typed_ctrl)
    except MonitorError as err:
        specs, ctrl_specs, spec_error = [], [], str(err)
        st.error(err)

    c1, c2, c3 = st.columns(3)
    n_total = len(all_items)
    if which == "decimals":
        n_pairs = c1.number_input("Pairs (each asked in both orders)", 1, MAX_N, key=widgets.widget_key("exp_pairs", DEFAULT_PAIRS),
                                  help="Drawn without replacement with the seed; more pairs narrow the intervals.")
        widgets.remember("exp_pairs")
        n_items = 2 * min(int(n_pairs), n_total)
    else:
        n = c1.number_input("Prompts (n, sampled)", 1, MAX_N, key=widgets.widget_key("exp_n", 40),
                            help="Drawn without replacement with the seed (all of them when n is larger than the set).")
        widgets.remember("exp_n")
        n_items = min(int(n), n_total)
    controls = c2.number_input("Random controls per spec", 0, MAX_CONTROLS,
                               key=widgets.widget_key("exp_controls", DEFAULT_CONTROLS),
                               help="Each a random neuron set with the spec's neurons per layer, matched on activation "
                                    "mass on these prompts. About 20 make a null distribution.")
    widgets.remember("exp_controls")
    seed = c3.number_input("Seed", 0, 2**31 - 1, key=widgets.widget_key("exp_seed", 0),
                           help="Seeds the sample, the controls and the bootstrap.")
    widgets.remember("exp_seed")
    c4, c5, c6 = st.columns([1, 1, 2], vertical_alignment="bottom")
    greedy = c4.toggle("Also score greedy replies", key=widgets.widget_key("exp_greedy", False),
                       help="Decodes a short reply per prompt for the baseline and the specs (not the controls).")
    widgets.remember("exp_greedy")
    mass_match = c5.toggle("Match controls on activation mass", key=widgets.widget_key("exp_mass", True),
                           help="Off: controls drawn uniformly within each layer.")
    widgets.remember("exp_mass")
    max_new = c6.number_input("Greedy reply tokens (at most)", 1, 64,
                              key=widgets.widget_key("exp_max_new", scoring.DEFAULT_MAX_NEW_TOKENS), disabled=not greedy)
    widgets.remember("exp_max_new")

    enabled = [s for s in specs if s.enabled]
    n_ctrl_c = len([s for s in ctrl_specs if s.enabled])
    n_conditions = 1 + len(enabled) + (len(enabled) > 1) + n_ctrl_c + (int(controls) * len(enabled) if enabled else 0)
    scorings = n_conditions * n_items
    rate = st.session_state.get("_exp_rate")
    if rate:
        timing = f"At this session's last measured rate ({rate:.2g} s per scoring) that is about **{duration(scorings * rate)}**. "
    elif getattr(getattr(lm, "device", None), "type", "cpu") == "cpu":
        lo, hi = SECONDS_PER_SCORE[bool(greedy)]
        timing = (f"On a CPU expect roughly **{duration(scorings * lo)}–{duration(scorings * hi)}** (the embedded model on "
                  f"2 cores, the more the busier the machine); a GPU is much faster. ")
    else:
        timing = ""
    st.caption(f"{n_conditions} condition{'s' * (n_conditions != 1)} × {n_items} prompts = **{scorings:,}** scorings. "
               + timing + "The page stays busy until it finishes.")
    if not enabled and not spec_error:
        st.warning("No steering spec: only the baseline will run (add one here or on the Steering page). Random controls "
                   "need a spec to match.")

    too_large = (hosted.experiment_too_large(scorings, SECONDS_PER_SCORE[bool(greedy)][1])
                 if res.cfg.hosted else None)
    if too_large:
        st.error(too_large)
    run = st.button("Run experiment", type="primary", key="exp_run", icon=":material/science:",
                    disabled=bool(items_error) or bool(spec_error) or not all_items or bool(too_large))
    if run and too_large:  # the button is disabled; a stale click still runs nothing
        run = False
    if run:
        try:
            if which == "decimals":
                items = prompt_sets.format_items(prompt_sets.sample_pairs(pairs, int(n_pairs), int(seed)), fmt)
            else:
                items = prompt_sets.sample_items(all_items, int(n), int(seed))
            selections, ctrl_sel, quantiles, mass = [], [], None, None
            if enabled or ctrl_specs:
                if res.db is None:
                    raise MonitorError("Steering specs need the neuron database: "
                                       + (res.dbr.error or res.mismatch or "none is loaded."))
                with st.spinner("Selecting the specs' neurons…"):
                    resolved = steering_specs.steering(res, enabled + ctrl_specs, strict=True)
                quantiles = resolved.quantiles
                selections, ctrl_sel = resolved.selections[: len(enabled)], resolved.selections[len(enabled):]
                if int(controls) and mass_match and selections:
                    from engine.controls import activation_mass

                    with st.spinner("Measuring activation mass for matched controls…"):
                        sample = prompt_sets.sample_items(items, 16, int(seed))
                        mass = activation_mass(lm, [it.chat() for it in sample], resources.get_view(res))
            conditions = ex.build_conditions(selections, lm.n_neurons, int(controls), int(seed), mass, ctrl_sel)
            config = {"experiment": which, "model": lm.name, "db": res.dbr.path.name if res.dbr.path else None,
                      "seed": int(seed), "controls": int(controls), "mass_matched": mass is not None,
                      "specs": [s.to_dict() for s in enabled], **what}
            total = len(items) * len(conditions)
            finished: dict[str, int] = {}
            with st.status(f"Scoring {len(items)} prompts under {len(conditions)} conditions…", expanded=True) as status:
                bar = st.progress(0.0, text="starting…")

                def progress(name: str, done: int, of: int) -> None:
                    finished[name] = done
                    k = sum(finished.values())
                    bar.progress(min(1.0, k / total), text=f"{name}: {done}/{of} · {k}/{total} scorings")

                result = ex.run_experiment(lm, items, conditions, quantiles, prefix=stem, greedy=bool(greedy),
                                           max_new_tokens=int(max_new), config=config, progress=progress)
                summary = ex.analyze(result, seed=int(seed))
                status.update(label=f"Done: {total:,} scorings in {result.seconds:.0f} s", state="complete",
                              expanded=False)
            st.session_state["exp_summary"] = summary
            st.session_state["_exp_rate"] = result.seconds / max(total, 1)
        except MonitorError as err:
            st.error(str(err))

    summary = st.session_state.get("exp_summary")
    if summary:
        _draw_results(summary)


def _draw_results(summary: dict) -> None:
    st.subheader("Results")
    metrics = [m for m in METRICS if any(m in r for r in summary["conditions"])]
    metric = st.radio("Metric", metrics, format_func=METRICS.get, horizontal=True,
                      key=widgets.widget_key("exp_metric", metrics[0]))
    widgets.remember("exp_metric")
    if metric not in metrics:
        metric = metrics[0]
    st.markdown("**What this shows**")
    st.info(summary["verdict"] + "\n\n" + honest_note(summary))
    st.altair_chart(accuracy_chart(summary, metric), key="exp_chart")
    st.caption("Bars: accuracy (a tie counts ½); whiskers: 95% Wilson interval with the pair as the unit; dashed line: "
               "chance. Random controls are summarised in the chart below.")
    null = null_chart(summary, metric)
    if null is not None:
        st.altair_chart(null, key="exp_null_chart")
        st.caption("Each grey tick is one random control's change in accuracy; red is the concept's. A concept whose "
                   "tick sits among the grey ones did nothing that random neurons of the same size don't.")
    df = results_table(summary, metric)
    pct = {c: st.column_config.NumberColumn(c, format="percent") for c in (
        "accuracy", "95% CI low", "95% CI high", "Δ vs baseline", "controls Δ 5%", "controls Δ 95%", "valid answers")}
    st.dataframe(df, hide_index=True, key="exp_table", column_config={
        **pct, **{c: st.column_config.NumberColumn(format="%.3g") for c in ("McNemar p (pairs)", "p (Holm)", "empirical p")},
        "percentile among controls": st.column_config.NumberColumn(format="%.0f"),
        "mass ratio": st.column_config.NumberColumn(format="%.2f"),
        "seconds": st.column_config.NumberColumn(format="%.0f"),
    })
    st.caption("McNemar's exact test on pairs (the two orders of a question count once), Holm-corrected across the "
               "report; percentile and empirical p: where the concept's change falls among its own random controls'.")
    markdown = ex.to_markdown(summary)
    with st.expander("The table as Markdown (as the CLI prints it)"):
        st.markdown(markdown)
    d1, d2 = st.columns(2)
    d1.download_button("Download results (JSON)", ex.to_json(summary, indent=2).encode(), file_name="experiment.json",
                       mime="application/json", key="exp_json", icon=":material/download:")
    d2.download_button("Download table (Markdown)", (markdown + "\n").encode(), file_name="experiment.md",
                       mime="text/markdown", key="exp_md", icon=":material/download:")


def _report_tab() -> None:
    st.caption(f"The replication suite runs every wording × set × concept with its random controls, a held-out wording "
               f"and range, and a scorer check, and writes one report: `{REPLICATE_COMMAND}`. Reports are read from "
               "`data/reports/`; you can also upload a `report.json`.")
    reports = list_reports()
    up = st.file_uploader("Upload a report.json", type=["json"], key="rep_upload")
    report = None
    try:
        if up is not None:
            report = json.loads(up.getvalue().decode("utf-8", errors="replace"))
        elif reports:
            pick = st.selectbox("Report", reports, format_func=lambda p: p.parent.name, key="rep_pick")
            report = json.loads(Path(pick).read_text(encoding="utf-8"))
        else:
            st.info("No report yet. Run `" + REPLICATE_COMMAND + "` (about 15–25 minutes on 2 CPU cores), then reload "
                    "this page.")
            return
        if not isinstance(report, dict) or "cells" not in report or "pooled" not in report:
            raise ValueError("not a replication report")
        _draw_report(report)
    except (ValueError, KeyError, TypeError) as err:
        st.error(f"This file is not a replication report written by `{REPLICATE_COMMAND}` ({err}).")


def _draw_report(report: dict) -> None:
    s = report["suite"]
    st.markdown(f"**{report['config'].get('model', '?')}**, database `{report['config'].get('db', '–')}` · formats "
                f"{', '.join(s['formats'])} · sets {', '.join(s['sets'])} · {s['pairs']} pairs per cell · "
                f"{s['controls']} controls per concept · {report['seconds'] / 60:.0f} min")
    st.info(report["verdict"])
    st.altair_chart(replication.effects_chart(report).properties(description="rep_effects"), key="rep_effects")
    st.caption("Per cell and concept: the change in complete-answer accuracy (dot, 95% cluster-bootstrap CI) and the "
               "5–95% band of its random controls' changes (grey).")
    dose = replication.dose_chart(report)
    if dose is not None:
        st.altair_chart(dose.properties(description="rep_dose"), key="rep_dose")
    rows = pd.DataFrame(replication.effect_rows(report))
    st.dataframe(rows, hide_index=True, key="rep_table", column_config={
        c: st.column_config.NumberColumn(c, format="percent") for c in
        ("baseline", "acc", "diff", "ci_lo", "ci_hi", "null_lo", "null_hi", "null_mean", "greedy_diff", "greedy_valid")})
    cc = report.get("copy_check")
    if cc:
        st.markdown(f"**Scorer check** (\"{cc['prompt']}\", {cc['n']} prompts): complete answers {cc['complete']:.0%}, "
                    f"first differing token {cc['first_diff']:.0%}, length-biased token sum {cc['token_sum']:.0%}.")
    md = replication.report_markdown(report)
    d1, d2, d3 = st.columns(3)
    d1.download_button("Report (JSON)", ex.to_json(report, indent=1).encode(), file_name="report.json",
                       mime="application/json", key="rep_json", icon=":material/download:")
    d2.download_button("Report (Markdown)", md.encode(), file_name="report.md", mime="text/markdown", key="rep_md",
                       icon=":material/download:")
    d3.download_button("Report (HTML)", replication.report_html(report).encode(), file_name="report.html",
                       mime="text/html", key="rep_html", icon=":material/download:")


with tab_run:
    _run_tab()
with tab_report:
    _report_tab()

steering_specs.sync_url()  # the session's specs in the address: a link to this page reproduces them
