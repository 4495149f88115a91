"""Steering experiments: accuracy under concept steering against the baseline and random controls.

The headline case: "Which is bigger: 9.8 or 9.11?". Every run scores the same
prompts under the baseline, each spec alone, their union and ``controls`` random-neuron
controls of the same size per layer (:func:`engine.experiments.build_conditions`), then
reports accuracy with 95% bootstrap intervals, paired McNemar tests and a plain verdict
(:func:`engine.experiments.analyze`). Prompts: the decimals set (sampled to ``n``) or a
custom JSON-lines file of ``{"prompt", "correct", "wrong"}``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import resources, steering_specs, widgets
from engine import experiments as ex
from engine import prompt_sets, scoring
from engine.specs import ConceptSpec, specs_from_json
from engine.errors import MonitorError

DEFAULT_N = 40
MAX_N = 100_000
DEFAULT_CONTROLS = 2
MAX_CONTROLS = 10
# Measured with the embedded model on 2 CPU cores, idle and shared with other jobs: seconds per scored prompt × condition.
SECONDS_PER_SCORE = {False: (0.3, 3.0), True: (0.8, 8.0)}  # (idle, busy)
METRICS = {"forced_choice": "forced choice", "greedy": "greedy reply"}
KIND_COLOURS = {"baseline": "#9e9e9e", "spec": "#d6604d", "union": "#b2182b", "control": "#4393c3"}
CUSTOM_EXAMPLE = '{"prompt": "Which is bigger: 9.8 or 9.11?", "correct": "9.8", "wrong": "9.11"}'


def items_from_text(text: str, name: str) -> list:
    """Items from JSON-lines text (:func:`engine.prompt_sets.load_items`), errors naming ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text(text, encoding="utf-8")
        try:
            return prompt_sets.load_items(path)
        except MonitorError as err:
            raise MonitorError(str(err).replace(str(path), name)) from err


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


def results_table(summary: dict, metric: str) -> pd.DataFrame:
    rows = []
    for r in summary["conditions"]:
        m = r.get(metric)
        if m is None:
            continue
        vb, vc = m.get("vs_baseline") or {}, m.get("vs_controls") or {}
        rows.append({
            "condition": r["name"], "kind": r["kind"], "neurons": r["neurons"], "accuracy": m["acc"],
            "95% CI low": m["lo"], "95% CI high": m["hi"],
            "Δ vs baseline": vb.get("diff"), "Δ CI": _ci(vb.get("ci")), "McNemar p vs baseline": vb.get("p"),
            "only this right": vb.get("a_only"), "only baseline right": vb.get("b_only"),
            "Δ vs controls' mean": vc.get("diff"), "p vs controls (max)": vc.get("p_max"),
            "mean log p(correct) − log p(wrong)": r["mean_margin"], "seconds": r["seconds"],
        })
    return pd.DataFrame(rows)


def _ci(ci) -> str | None:
    if not ci:
        return None
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] pp"


def accuracy_chart(summary: dict, metric: str) -> alt.LayerChart:
    """Accuracy per condition (one horizontal bar each) with its 95% bootstrap interval; chance (50%) dashed."""
    d = results_table(summary, metric)[["condition", "kind", "neurons", "accuracy", "95% CI low", "95% CI high"]]
    d = d.rename(columns={"95% CI low": "lo", "95% CI high": "hi"})
    order = list(d["condition"])
    kinds = [k for k in KIND_COLOURS if k in set(d["kind"])]
    y = alt.Y("condition:N", sort=order, title=None, axis=alt.Axis(labelLimit=300, labelOverlap=False))
    tooltip = [alt.Tooltip("condition:N"), alt.Tooltip("neurons:Q"), alt.Tooltip("accuracy:Q", format=".1%"),
               alt.Tooltip("lo:Q", format=".1%", title="95% CI low"), alt.Tooltip("hi:Q", format=".1%", title="95% CI high")]
    bars = alt.Chart(d).mark_bar(opacity=0.85).encode(
        y=y, x=alt.X("accuracy:Q", title=f"{METRICS[metric]} accuracy (95% bootstrap CI)",
                     scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.Color("kind:N", title="condition", scale=alt.Scale(domain=kinds, range=[KIND_COLOURS[k] for k in kinds])),
        tooltip=tooltip)
    errors = alt.Chart(d).mark_errorbar(ticks=True, color="#777", thickness=1.5).encode(
        y=y, x=alt.X("lo:Q", title=None), x2="hi:Q", tooltip=tooltip)
    chance = alt.Chart(pd.DataFrame({"x": [0.5]})).mark_rule(strokeDash=[4, 3], color="#888").encode(x="x:Q")
    return alt.layer(bars, errors, chance).properties(height=alt.Step(34), description="exp_chart")


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _jsonable(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(type(x).__name__)


def honest_note(summary: dict) -> str:
    """What the random controls allow us to say, beyond the engine's verdict."""
    has_steer = any(r["kind"] in ("spec", "union") for r in summary["conditions"])
    has_ctrl = any(r["kind"] == "control" for r in summary["conditions"])
    n = summary["n"]
    if not has_steer:
        return "Only the baseline ran: add a steering spec to test a concept."
    text = ""
    if not has_ctrl:
        text = ("No random control ran, so a change cannot be credited to the concept: steering that many neurons "
                "anywhere might do the same. Run at least one control. ")
    return text + (f"With n = {n} prompts the 95% intervals are about ±{100 / math.sqrt(max(n, 1)):.0f} points wide; "
                   "small differences are within noise. The reported effect was fragile in a replication (prompt "
                   "format, steered tokens), so vary both before trusting it.")


# --------------------------------------------------------------------------- the page
steering_specs.restore_from_url()
st.title("Steering experiments")
st.caption("Does steering a concept change accuracy more than steering as many random neurons? Each prompt is scored "
           "under the baseline, each spec, their union and random controls (same number of neurons per layer, same "
           "mode and tokens). Forced choice: correct when log p(correct answer) > log p(wrong answer) after the reply "
           "stem; greedy: the first number of the greedy reply.")

res = resources.resources()
if res.browse_only:
    st.info(f"{res.browse_only} Experiments need the model, so they cannot run.")
    st.stop()
if res.model.error:
    st.error(f"The model could not be loaded, so experiments cannot run: {res.model.error}")
    st.stop()
lm = res.lm

which = st.radio("Prompts", ["decimals", "custom"], horizontal=True, key=widgets.widget_key("exp_which", "decimals"),
                 format_func={"decimals": "Decimals (X.Y vs X.Z, e.g. 9.8 vs 9.11)",
                              "custom": "Custom (JSON lines of prompt, correct, wrong)"}.get)
widgets.remember("exp_which")
items_error = None
all_items: list = []
if which == "decimals":
    c1, c2 = st.columns(2)
    template = c1.text_input("Template", key=widgets.widget_key("exp_template", prompt_sets.DECIMALS_TEMPLATE),
                             help="Must contain {a} and {b}. 1,280 questions: both orders of 640 pairs.")
    widgets.remember("exp_template")
    stem = c2.text_input("Reply stem", key=widgets.widget_key("exp_stem", prompt_sets.DECIMALS_PREFIX),
                         help="The assistant reply starts with this before the answer is scored.")
    widgets.remember("exp_stem")
    try:
        all_items = prompt_sets.decimal_items(template)
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
st.text_area("More specs, one per line", key=widgets.widget_key("exp_specs", ""), height=80,
             placeholder="Bible verses:suppress:500\ndates:suppress:500\nlove:strengthen:50:strength=1.0",
             help="concept[:mode[:k[:key=value…]]], keys strength, layers (lo-hi), min_score, keyword, polarity, "
                  "tokens; or a JSON list as exported by the steering panel.")
typed = widgets.remember("exp_specs") or ""
spec_error = None
try:
    specs = (list(session_specs) if use_session and session_specs else []) + parse_typed_specs(typed)
except MonitorError as err:
    specs, spec_error = [], str(err)
    st.error(err)

c1, c2, c3 = st.columns(3)
n_total = len(all_items)
n = c1.number_input("Prompts (n, sampled)", 1, MAX_N, key=widgets.widget_key("exp_n", DEFAULT_N),
                    help="Drawn without replacement with the seed (all of them when n is larger than the set); more "
                         "prompts narrow the intervals but take longer.")
widgets.remember("exp_n")
controls = c2.number_input("Random controls", 0, MAX_CONTROLS, key=widgets.widget_key("exp_controls", DEFAULT_CONTROLS),
                           help="Each is a fresh random neuron set as large as the union, per layer.")
widgets.remember("exp_controls")
seed = c3.number_input("Seed", 0, 2**31 - 1, key=widgets.widget_key("exp_seed", 0),
                       help="Seeds the prompt sample, the controls (seed, seed+1, …) and the bootstrap.")
widgets.remember("exp_seed")
c4, c5 = st.columns([1, 2], vertical_alignment="bottom")
greedy = c4.toggle("Also score greedy replies", key=widgets.widget_key("exp_greedy", False),
                   help="Decodes a short reply per prompt and condition: about 2–3× slower.")
widgets.remember("exp_greedy")
max_new = c5.number_input("Greedy reply tokens (at most)", 1, 64, key=widgets.widget_key("exp_max_new", scoring.DEFAULT_MAX_NEW_TOKENS),
                          disabled=not greedy)
widgets.remember("exp_max_new")

enabled = [s for s in specs if s.enabled]
n_conditions = 1 + len(enabled) + (1 if len(enabled) > 1 else 0) + (int(controls) if enabled else 0)
n_items = min(int(n), n_total) if n_total else 0
scorings = n_conditions * n_items
rate = st.session_state.get("_exp_rate", {}).get(bool(greedy))
device = getattr(getattr(lm, "device", None), "type", "cpu")
if rate:
    timing = (f"At this session's last measured rate ({rate:.2g} s per scoring) that is about **{duration(scorings * rate)}**. ")
elif device == "cpu":
    lo, hi = SECONDS_PER_SCORE[bool(greedy)]
    timing = (f"On a CPU expect roughly **{duration(scorings * lo)}–{duration(scorings * hi)}** (the embedded model on 2 "
              f"cores: {lo:g}–{hi:g} s per scoring, the more the busier the machine"
              + (", greedy replies included" if greedy else "") + "); a GPU is much faster. ")
else:
    timing = ""
st.caption(f"{n_conditions} condition{'s' * (n_conditions != 1)} × {n_items} prompts = **{scorings:,}** scorings. "
           + timing + "The page stays busy until it finishes.")
if not enabled and not spec_error:
    st.warning("No steering spec: only the baseline will run (add one here or on the Steering page). Random controls "
               "need a spec to match.")

run = st.button("Run experiment", type="primary", key="exp_run", icon=":material/science:",
                disabled=bool(items_error) or bool(spec_error) or not all_items)
if run:
    try:
        items = prompt_sets.sample_items(all_items, int(n), int(seed))
        selections, quantiles = [], None
        if enabled:
            if res.db is None:
                raise MonitorError("Steering specs need the neuron database: "
                                   + (res.dbr.error or res.mismatch or "none is loaded."))
            with st.spinner("Selecting the specs' neurons…"):
                resolved = steering_specs.steering(res, enabled, strict=True)
            selections, quantiles = resolved.selections, resolved.quantiles
        conditions = ex.build_conditions(selections, lm.n_neurons, int(controls), int(seed))
        config = {"experiment": which, "model": lm.name, "db": res.dbr.path.name if res.dbr.path else None,
                  "seed": int(seed), "controls": int(controls), "specs": [s.to_dict() for s in enabled],
                  "template": st.session_state.get("exp_template") if which == "decimals" else None}
        total = len(items) * len(conditions)
        finished: dict[str, int] = {}
        with st.status(f"Scoring {len(items)} prompts under {len(conditions)} conditions…", expanded=True) as status:
            bar = st.progress(0.0, text="starting…")

            def progress(name: str, done: int, of: int) -> None:
                finished[name] = done
                k = sum(finished.values())
                bar.progress(min(1.0, k / total), text=f"{name}: {done}/{of} prompts · {k}/{total} scorings")

            result = ex.run_experiment(lm, items, conditions, quantiles, prefix=stem, greedy=bool(greedy),
                                       max_new_tokens=int(max_new), config=config, progress=progress)
            summary = ex.analyze(result, seed=int(seed))
            status.update(label=f"Done: {total:,} scorings in {result.seconds:.0f} s", state="complete", expanded=False)
        st.session_state["exp_summary"] = summary
        st.session_state.setdefault("_exp_rate", {})[bool(greedy)] = result.seconds / max(total, 1)
    except MonitorError as err:
        st.error(str(err))

summary = st.session_state.get("exp_summary")
if summary:
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
    st.caption("Bars: accuracy; whiskers: 95% percentile-bootstrap interval over prompts; dashed line: chance.")
    df = results_table(summary, metric)
    pct = {c: st.column_config.NumberColumn(c, format="percent") for c in ("accuracy", "95% CI low", "95% CI high",
                                                                            "Δ vs baseline", "Δ vs controls' mean")}
    st.dataframe(df, hide_index=True, key="exp_table", column_config={
        **pct,
        "McNemar p vs baseline": st.column_config.NumberColumn(format="%.3g"),
        "p vs controls (max)": st.column_config.NumberColumn(format="%.3g"),
        "mean log p(correct) − log p(wrong)": st.column_config.NumberColumn(format="%+.3f"),
        "seconds": st.column_config.NumberColumn(format="%.0f"),
    })
    st.caption("Paired tests on the same prompts: McNemar's exact test on the prompts one condition gets right and the "
               "other wrong; “p vs controls (max)” is the largest p against any single control (the condition beats "
               "every control at that level only if it is small).")
    markdown = ex.to_markdown(summary)
    with st.expander("The table as Markdown (as the CLI prints it)"):
        st.markdown(markdown)
    d1, d2 = st.columns(2)
    d1.download_button("Download results (JSON)", json.dumps(summary, indent=2, default=_jsonable).encode(),
                       file_name="experiment.json", mime="application/json", key="exp_json", icon=":material/download:")
    d2.download_button("Download table (Markdown)", (markdown + "\n").encode(), file_name="experiment.md",
                       mime="text/markdown", key="exp_md", icon=":material/download:")

steering_specs.sync_url()  # the session's specs in the address: a link to this page reproduces them
