"""Semantic steering: type a concept, steer the neurons whose descriptions match it, see what changes.

Drawn as a panel under the chat page's trace (:func:`register_panel`) and as the whole
Steering page (``pages/steering.py``); both call :func:`render` on the same per-session specs
(:mod:`dashboard.steering_specs` holds the list, its ``?steer=`` link and its resolution).

* **Specs**: a form adds or edits an :class:`engine.specs.ConceptSpec` (concept,
  suppress/strengthen, top k, filters, token range); the list toggles, edits and deletes
  them; the union of the enabled ones is summarised (per-layer counts, conflicts, overlap).
* **Selected neurons**: one spec's neurons with their similarity and description, as a table
  and a CSV download.
* **Effect**: greedy unsteered vs steered generations of the conversation's last user turn
  (:func:`engine.generate.compare_generations`), differing tokens highlighted, and the
  answer candidates' probabilities before and after (:func:`engine.generate.answer_probabilities`)
  as an Altair chart.
* **Save / share**: JSON download, paste or upload, and the ``?steer=`` link.

Every user mistake (empty concept, k out of range, overlapping token spans, malformed JSON
or link) arrives as :class:`~engine.errors.MonitorError` and is shown with ``st.error``.
"""

from __future__ import annotations

import dataclasses
import re

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import hosted, links, resources, session, steering_specs, widgets
from dashboard.highlight import POS_HEX, token_spans
from dashboard.panels import ChatContext, register_panel
from engine.errors import MonitorError
from engine.specs import (DEFAULT_K, DEFAULT_STRENGTH, MAX_K, SPEC_MODES, ConceptSpec, SteeringUnion, specs_from_json,
                          specs_to_json, specs_to_url)
from engine.steering import parse_token_range, token_range_text

DEFAULT_CANDIDATES = "9.8, 9.11"
DEFAULT_STEM = "The bigger number is "
DEFAULT_EFFECT_TOKENS = 24
TOKEN_CHOICES = {
    "last_user": "Last user turn",
    "prompt": "Whole prompt",
    "prompt+generated": "Prompt + generated tokens",
    "last_user+generated": "Last user turn + generated tokens",
    "positions": "Token positions…",
}
POLARITIES = {"both": None, "positive": 1, "negative": -1}
NO_MIN = -1.0  # the min-score slider's "no filter" end
FORM_DEFAULTS = {"sf_concept": "", "sf_mode": "suppress", "sf_k": None, "sf_strength": DEFAULT_STRENGTH["strengthen"],
                 "sf_keyword": "", "sf_min_score": NO_MIN, "sf_polarity": "both", "sf_tokens": "last_user",
                 "sf_positions": ""}


# --------------------------------------------------------------------------- the spec form
def _form_values_from(spec: ConceptSpec, n_layers: int) -> dict:
    text = token_range_text(spec.tokens)
    if spec.tokens.kind == "positions":
        choice, positions = "positions", text[len("positions:"):]
    else:
        choice, positions = text, ""
    lo, hi = spec.layer_range or (0, n_layers - 1)
    return {
        "sf_concept": spec.concept, "sf_mode": spec.mode, "sf_k": spec.k if spec.neurons is None else None,
        "sf_strength": float(spec.strength) if spec.mode == "strengthen" else DEFAULT_STRENGTH["strengthen"],
        "sf_keyword": spec.keyword or "", "sf_layers": (min(lo, n_layers - 1), min(hi, n_layers - 1)),
        "sf_min_score": max(NO_MIN, min(1.0, float(spec.min_score))) if spec.min_score is not None else NO_MIN,
        "sf_polarity": {1: "positive", -1: "negative"}.get(spec.polarity, "both"),
        "sf_tokens": choice if choice in TOKEN_CHOICES else "last_user", "sf_positions": positions,
    }


def _begin_edit(entry_id: int, n_layers: int) -> None:
    entry = steering_specs.find_entry(entry_id)
    if entry is None:
        return
    st.session_state["_steer_edit"] = entry_id
    st.session_state.update(_form_values_from(entry.spec, n_layers))
    st.session_state.pop("_steer_form_error", None)


def _reset_form(n_layers: int) -> None:
    st.session_state.update(FORM_DEFAULTS)
    st.session_state["sf_layers"] = (0, n_layers - 1)


def _cancel_edit(n_layers: int) -> None:
    st.session_state.pop("_steer_edit", None)
    _reset_form(n_layers)


def _delete(entry_id: int) -> None:
    st.session_state[steering_specs.SPECS] = [e for e in steering_specs.entries() if e.id != entry_id]
    if st.session_state.get("_steer_edit") == entry_id:
        st.session_state.pop("_steer_edit", None)
    steering_specs.mark_changed()


def _toggle(entry_id: int) -> None:
    entry = steering_specs.find_entry(entry_id)
    if entry is not None:
        entry.spec = dataclasses.replace(entry.spec, enabled=bool(st.session_state.get(f"steer_on_{entry_id}")))
        steering_specs.mark_changed()


def token_range_from(choice: str, positions: str | None):
    """The :class:`TokenRange` a form choice names; ``positions`` like ``3-7,9`` (optionally ``+generated``)."""
    if choice != "positions":
        return parse_token_range(choice)
    text = (positions or "").strip()
    if not text:
        raise MonitorError("Type the token positions to steer, e.g. 3-7,12 (prompt token indices), "
                           "or pick another token range.")
    return parse_token_range(text if text.startswith("positions:") else "positions:" + text)


def spec_from_form(n_layers: int, base: ConceptSpec | None = None) -> ConceptSpec:
    """A :class:`ConceptSpec` from the form's widgets (raises MonitorError with what to fix).

    ``base``: the spec being edited; its explicit neuron list (a linter cluster) and its
    enabled state are kept.
    """
    g = st.session_state
    mode = g.get("sf_mode") or "suppress"
    lo, hi = g.get("sf_layers") or (0, n_layers - 1)
    min_score = g.get("sf_min_score", NO_MIN)
    neurons = base.neurons if base is not None else None
    k = g.get("sf_k")
    return ConceptSpec(
        str(g.get("sf_concept") or ""), mode=mode,
        k=None if neurons is not None or k is None else k,
        strength=float(g.get("sf_strength", DEFAULT_STRENGTH["strengthen"])) if mode == "strengthen" else None,
        keyword=str(g.get("sf_keyword") or "").strip() or None,
        layer_range=None if (int(lo), int(hi)) == (0, n_layers - 1) else (int(lo), int(hi)),
        min_score=None if min_score is None or float(min_score) <= NO_MIN else float(min_score),
        polarity=POLARITIES.get(g.get("sf_polarity") or "both"),
        tokens=token_range_from(g.get("sf_tokens") or "last_user", g.get("sf_positions")),
        enabled=base.enabled if base is not None else True, neurons=neurons)


def _draw_form(res) -> None:
    n_layers = res.db.n_layers
    editing = steering_specs.find_entry(st.session_state.get("_steer_edit", -1))
    if st.session_state.pop("_steer_reset_form", False) or "sf_mode" not in st.session_state:
        # first draw, after a save, or back from another page (Streamlit dropped the widgets' state)
        if editing is not None:
            st.session_state.update(_form_values_from(editing.spec, n_layers))
        else:
            _reset_form(n_layers)
    if "sf_layers" not in st.session_state:
        st.session_state["sf_layers"] = (0, n_layers - 1)
    with st.form("steer_form", border=True):
        if editing is not None:
            st.markdown(f"**Edit:** {editing.spec.label}")
            if editing.spec.neurons is not None:
                st.caption("This spec lists its neurons (from a linter cluster): top k and the search filters do not "
                           "apply; mode, strength and token range do.")
        else:
            st.markdown("**Add a concept**")
        c1, c2 = st.columns([3, 2])
        c1.text_input("Concept", key="sf_concept", placeholder="e.g. Bible verses, dates, phone versions",
                      help="Embedded and matched against every neuron description (cosine similarity).")
        c2.radio("Mode", list(SPEC_MODES), key="sf_mode", horizontal=True,
                 help="Suppress: activation ← 0. Strengthen: activation ← strength × the neuron's extreme quantile "
                      "(1−1e-7 for positive, 1e-7 for negative polarity).")
        c3, c4, c5 = st.columns(3)
        c3.number_input("Top k neurons", value=None, key="sf_k", step=1, placeholder="500 (suppress) · 50 (strengthen)",
                        help=f"How many (layer, neuron, polarity) descriptions to take, best match first: 1 to {MAX_K}. "
                             f"Empty: {DEFAULT_K['suppress']} to suppress, {DEFAULT_K['strengthen']} to strengthen.")
        c4.slider("Strength (strengthen only)", -2.0, 3.0, step=0.05, key="sf_strength",
                  help="Replacement value = strength × the neuron's extreme quantile; default 0.75.")
        c5.selectbox("Polarity", list(POLARITIES), key="sf_polarity",
                     help="Only positive or only negative descriptions, or both.")
        c6, c7, c8 = st.columns(3)
        c6.text_input("Keyword filter", key="sf_keyword", placeholder="optional, e.g. verse",
                      help="Keep only descriptions containing this text (literal, case-insensitive).")
        c7.slider("Layers", 0, n_layers - 1, key="sf_layers")
        c8.slider("Minimum description score", NO_MIN, 1.0, step=0.05, key="sf_min_score",
                  help="Simulation score (correlation) of the description; -1 = no filter.")
        c9, c10 = st.columns([2, 3])
        c9.radio("Steer which tokens", list(TOKEN_CHOICES), format_func=TOKEN_CHOICES.get, key="sf_tokens",
                 help="Default: the last user turn, as in the reference. Generated tokens: also every token the model "
                      "writes (and the answer candidates scored below).")
        c10.text_input("Token positions (for “Token positions…”)", key="sf_positions", placeholder="e.g. 3-7,12  or  3-7+generated",
                       help="Prompt token indices as shown in the trace, inclusive spans; spans must not overlap.")
        if editing is not None:
            b1, b2 = st.columns(2)
            save = b1.form_submit_button("Save changes", type="primary", key="steer_save")
            b2.form_submit_button("Cancel", key="steer_cancel", on_click=_cancel_edit, args=(n_layers,))
        else:
            save = st.form_submit_button("Add and select neurons", type="primary", key="steer_add",
                                         icon=":material/add:")
    if save:
        try:
            spec = spec_from_form(n_layers, editing.spec if editing is not None else None)
            with st.spinner(f"Selecting the neurons that match “{spec.concept}”…"):
                sel = steering_specs.selection(res, spec)
        except MonitorError as err:
            st.error(str(err))
            return
        if editing is not None:
            editing.spec = spec
            st.session_state.pop("_steer_edit", None)
            steering_specs.mark_changed()
            st.session_state["_steer_notice"] = f"Updated {spec.label}: {len(sel)} neurons selected."
        else:
            if spec in steering_specs.current_specs():
                st.warning(f"{spec.label} is already in the list.")
                return
            steering_specs.add_spec(spec)
            st.session_state["_steer_notice"] = f"Added {spec.label}: {len(sel)} neurons selected."
        st.session_state["_steer_reset_form"] = True
        st.rerun()


# --------------------------------------------------------------------------- the spec list
def _describe_spec(spec: ConceptSpec) -> str:
    bits = [f"tokens: {TOKEN_CHOICES.get(token_range_text(spec.tokens), token_range_text(spec.tokens))}"]
    if spec.mode == "strengthen":
        bits.append(f"strength {spec.strength:g} × extreme quantile")
    if spec.neurons is not None:
        bits.append("neurons listed explicitly")
    if spec.keyword:
        bits.append(f"keyword “{spec.keyword}”")
    if spec.layer_range:
        bits.append(f"layers {spec.layer_range[0]}–{spec.layer_range[1]}")
    if spec.min_score is not None:
        bits.append(f"score ≥ {spec.min_score:g}")
    if spec.polarity is not None:
        bits.append("positive only" if spec.polarity > 0 else "negative only")
    return " · ".join(bits)


def _draw_list(res) -> None:
    items = steering_specs.entries()
    if not items:
        st.info("No steering specs yet. Type a concept above (e.g. “Bible verses”), or turn a linter cluster into one.")
        return
    n_layers = res.db.n_layers
    for e in items:
        with st.container(border=True):
            c1, c2, c3, c4 = st.columns([0.7, 5, 1, 1], vertical_alignment="center")
            key = f"steer_on_{e.id}"
            if key not in st.session_state:
                st.session_state[key] = e.spec.enabled
            c1.toggle("Enabled", key=key, on_change=_toggle, args=(e.id,), label_visibility="collapsed",
                      help="Enable or disable this spec.")
            try:
                sel = steering_specs.selection(res, e.spec)
                found = (f"**{len(sel)}** neurons selected (best similarity {max(sel.similarity):.2f})"
                         if e.spec.neurons is None and sel.similarity else f"**{len(sel)}** neurons")
                err = None
            except MonitorError as exc:
                found, err = "", str(exc)
            c2.markdown(f"**{e.spec.label}**" + ("" if e.spec.enabled else " · _disabled_") + "  \n"
                        + _describe_spec(e.spec) + (f" · {found}" if found else ""))
            c3.button("Edit", key=f"steer_edit_{e.id}", on_click=_begin_edit, args=(e.id, n_layers),
                      icon=":material/edit:", width="stretch")
            c4.button("Delete", key=f"steer_del_{e.id}", on_click=_delete, args=(e.id,),
                      icon=":material/delete:", width="stretch")
            if err:
                st.error(f"This spec selects nothing and is left out: {err}")


def _draw_union(res) -> SteeringUnion | None:
    try:
        u = steering_specs.steering(res).union
    except MonitorError as err:
        st.error(str(err))
        return None
    if not u.selections:
        st.caption("No enabled spec: nothing is steered.")
        return u
    layers = " · ".join(f"L{l}: {c}" for l, c in u.per_layer().items())
    st.markdown(f"**Union:** {len(u):,} distinct neurons steered by {len(u.selections)} enabled spec"
                f"{'s' * (len(u.selections) != 1)} · per layer {layers}"
                + (f" · {u.duplicates} duplicate picks counted once" if u.duplicates else ""))
    if u.conflicts:
        st.warning(f"{len(u.conflicts)} contradictory picks (the same neuron suppressed by one spec and strengthened by "
                   "another on shared tokens): the more similar pick wins.")
        st.dataframe(pd.DataFrame([{"layer": c["layer"], "neuron": c["neuron"], "kept": c["kept"]["spec"],
                                    "dropped": c["dropped"]["spec"]} for c in u.conflicts]),
                     hide_index=True, key="steer_conflicts", height=160)
    if len(u.selections) > 1:
        st.markdown("**Overlap between specs** (shared (layer, neuron) pairs and Jaccard index)")
        ov = pd.DataFrame(u.overlap).rename(columns={"a": "spec A", "b": "spec B"})
        st.dataframe(ov, hide_index=True, key="steer_overlap",
                     column_config={"jaccard": st.column_config.NumberColumn("Jaccard", format="%.3f")})
    return u


def _draw_neurons(res) -> None:
    items = steering_specs.entries()
    if not items:
        st.caption("Add a spec to list its neurons.")
        return
    ids = [e.id for e in items]
    if st.session_state.get("_steer_show_next") in ids:
        widgets.set_widget("steer_show", st.session_state.pop("_steer_show_next"))
    if st.session_state.get("w_steer_show") not in ids:
        widgets.set_widget("steer_show", ids[-1])
    labels = {e.id: e.spec.label for e in items}
    pick = st.selectbox("Neurons of", ids, format_func=lambda i: labels.get(i, str(i)),
                        key=widgets.widget_key("steer_show", ids[-1]))
    widgets.remember("steer_show")
    entry = steering_specs.find_entry(pick)
    try:
        sel = steering_specs.selection(res, entry.spec)
    except MonitorError as err:
        st.error(str(err))
        return
    df = neuron_table(res, sel)
    st.dataframe(df, hide_index=True, key="steer_neurons", height=320, column_config={
        "similarity": st.column_config.NumberColumn("similarity", format="%.3f", width="small"),
        "score": st.column_config.NumberColumn("score", format="%.2f", width="small"),
        "description": st.column_config.TextColumn("description", width="large"),
        "url": st.column_config.LinkColumn("neuron page", display_text="open ↗", width="small"),
    })
    slug = re.sub(r"[^a-z0-9]+", "-", entry.spec.concept.lower()).strip("-")[:40] or "spec"
    st.download_button("Download these neurons (CSV)", df.drop(columns=["url"]).to_csv(index=False).encode(),
                       file_name=f"steer-{slug}.csv", mime="text/csv", key="steer_csv", icon=":material/download:")


def neuron_table(res, sel) -> pd.DataFrame:
    """One row per selected (layer, neuron, polarity): similarity, that polarity's description and score."""
    desc = resources.describe(res, [(l, n) for l, n, _ in sel.neurons])
    rows = []
    for i, ((l, n, p), sim) in enumerate(zip(sel.neurons, sel.similarity)):
        side = "pos" if p > 0 else "neg"
        d = desc.iloc[i]
        rows.append({"rank": i + 1, "layer": l, "neuron": n, "polarity": "positive" if p > 0 else "negative",
                     "similarity": float(sim), "summary": d.get(f"summary_{side}"),
                     "description": d.get(f"description_{side}"), "score": d.get(f"score_{side}"),
                     "url": links.neuron_url(l, n)})
    return pd.DataFrame(rows, columns=["rank", "layer", "neuron", "polarity", "similarity", "summary", "description",
                                       "score", "url"])


# --------------------------------------------------------------------------- save and load
def _draw_save_load() -> None:
    specs = steering_specs.current_specs()
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Save**")
        st.download_button("Download specs (JSON)", specs_to_json(specs, indent=2).encode(),
                           file_name="steering-specs.json", mime="application/json", key="steer_json_dl",
                           disabled=not specs, icon=":material/download:")
        if specs:
            st.markdown("The address bar holds the steering (`?steer=…`): copy it to share. The parameter alone:")
            st.code(f"?{steering_specs.URL_PARAM}={specs_to_url(specs)}", language=None, wrap_lines=True)
        else:
            st.caption("Add a spec to save or share it.")
    with c2:
        st.markdown("**Load**")
        st.text_area("Paste specs JSON or a steering link", key="steer_paste", height=110,
                     placeholder='[{"concept": "Bible verses", "mode": "suppress", "k": 500}]')
        b1, b2 = st.columns(2)
        replace_all = b1.button("Replace specs", key="steer_load_replace", icon=":material/upload:")
        append = b2.button("Add to specs", key="steer_load_add", icon=":material/playlist_add:")
        if replace_all or append:
            try:
                loaded = steering_specs.parse_specs_text(st.session_state.get("steer_paste", ""))
            except MonitorError as err:
                st.error(str(err))
            else:
                if replace_all:
                    steering_specs.set_specs(loaded)
                else:
                    for s in loaded:
                        steering_specs.add_spec(s)
                st.session_state["_steer_notice"] = f"Loaded {len(loaded)} spec{'s' * (len(loaded) != 1)}."
                st.rerun()
        up = st.file_uploader("…or upload a specs JSON file (replaces the specs)", type=["json"], key="steer_upload")
        if up is not None and getattr(up, "file_id", up.name) != st.session_state.get("_steer_upload_id"):
            st.session_state["_steer_upload_id"] = getattr(up, "file_id", up.name)
            try:
                loaded = specs_from_json(up.getvalue().decode("utf-8", errors="replace"))
            except MonitorError as err:
                st.error(f"{up.name}: {err}")
            else:
                steering_specs.set_specs(loaded)
                st.session_state["_steer_notice"] = f"Loaded {len(loaded)} specs from {up.name}."
                st.rerun()


# --------------------------------------------------------------------------- the effect
def prompt_of(chat: list[dict]) -> list[dict]:
    """The chat up to and including its last user message (what steering and scoring continue)."""
    last = max((i for i, m in enumerate(chat) if m["role"] == "user"), default=None)
    return [] if last is None else list(chat[: last + 1])


def parse_candidates(text: str) -> list[str]:
    out = [c.strip() for c in re.split(r"[,\n]", text or "")]
    return list(dict.fromkeys(c for c in out if c))


def probability_chart(rows: list[dict], field: str = "prob") -> alt.Chart:
    """Grouped bars: each candidate's probability before (unsteered) and after (steered)."""
    data = []
    for r in rows:
        for when, suffix in (("before (unsteered)", "before"), ("after (steered)", "after")):
            data.append({"candidate": r["candidate"], "when": when, "value": r[f"{field}_{suffix}"],
                         "logprob": r[f"logprob_{suffix}"], "share": r[f"share_{suffix}"], "prob": r[f"prob_{suffix}"]})
    title = "p(exactly this answer | prompt, stem)" if field == "prob" else "share among the candidates"
    order = ["before (unsteered)", "after (steered)"]
    return alt.Chart(pd.DataFrame(data)).mark_bar().encode(
        x=alt.X("candidate:N", title="answer candidate", sort=[r["candidate"] for r in rows],
                axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("when:N", sort=order),
        y=alt.Y("value:Q", title=title, scale=alt.Scale(domain=[0, 1]) if field == "share" else alt.Undefined),
        color=alt.Color("when:N", title=None, sort=order, scale=alt.Scale(domain=order, range=["#9e9e9e", POS_HEX])),
        tooltip=[alt.Tooltip("candidate:N"), alt.Tooltip("when:N"), alt.Tooltip("prob:Q", format=".4f", title="p"),
                 alt.Tooltip("logprob:Q", format="+.3f", title="log p"),
                 alt.Tooltip("share:Q", format=".3f", title="share among candidates")],
    ).properties(height=260, description="steer_probs")


def _draw_effect(res, chat: list[dict]) -> None:
    from engine.generate import answer_probabilities, compare_generations

    lm = res.lm
    prompt = prompt_of(chat)
    if lm is None:
        st.info(f"The model is not loaded ({res.model.error}), so the effect cannot be shown.")
        return
    if not prompt:
        st.info("Send a message first: the effect is measured on the conversation's last user turn.")
        return
    c1, c2, c3 = st.columns([2, 2, 1.2])
    c1.text_input("Answer candidates (comma-separated)", key=widgets.widget_key("steer_cands", DEFAULT_CANDIDATES),
                  help="The probability that the reply's answer is exactly each candidate (its tokens, then a token "
                       "that ends it), before and after steering.")
    widgets.remember("steer_cands")
    c2.text_input("Answer stem", key=widgets.widget_key("steer_stem", DEFAULT_STEM),
                  help="Text the reply starts with before the candidate, e.g. “The bigger number is ”. May be empty.")
    widgets.remember("steer_stem")
    limit = min(256, res.cfg.max_new_tokens)
    hosted.clamp_widget("steer_max_new", limit)
    c3.number_input("Tokens to generate", 1, limit, key=widgets.widget_key("steer_max_new", DEFAULT_EFFECT_TOKENS))
    widgets.remember("steer_max_new")
    last_user = prompt[-1]["content"]
    st.caption(f"Measured on the last user turn: “{last_user[:160]}{'…' if len(last_user) > 160 else ''}” "
               "(greedy decoding, unsteered vs steered).")
    cands = parse_candidates(st.session_state.get("steer_cands", ""))
    stem = str(st.session_state.get("steer_stem") or "")
    max_new = min(int(st.session_state.get("steer_max_new") or DEFAULT_EFFECT_TOKENS), limit)
    enabled = steering_specs.current_specs(enabled_only=True)
    key = (lm.name, session.conversation_key(prompt), specs_to_url(enabled) if enabled else "", tuple(cands), stem,
           max_new, res.dbr.stamp)
    run = st.button("Show the effect", type="primary", key="steer_run", icon=":material/play_arrow:",
                    disabled=not enabled, help=None if enabled else "Enable at least one spec first.")
    if run:
        if not cands:
            st.warning("Type at least one answer candidate (e.g. 9.8, 9.11) to compare probabilities.")
            return
        try:
            with st.spinner("Generating unsteered and steered replies and scoring the candidates…"):
                r = steering_specs.steering(res)
                u, q, problems = r.union, r.quantiles, r.problems
                if not u.interventions:
                    raise MonitorError("The enabled specs select no neurons: nothing to steer.")
                diff = compare_generations(lm, prompt, u.interventions, q, max_new_tokens=max_new)
                probs = answer_probabilities(lm, prompt, cands, u.interventions, q, prefix=stem)
        except MonitorError as err:
            st.error(str(err))
            return
        st.session_state["_steer_effect"] = {"key": key, "diff": diff, "probs": probs, "n": len(u),
                                             "labels": [s.spec.label for s in u.selections], "problems": problems}
    effect = st.session_state.get("_steer_effect")
    if not effect:
        return
    if effect["key"] != key:
        st.caption("The conversation, specs or candidates changed since the effect below was computed: press "
                   "“Show the effect” to update it.")
    for p in effect["problems"]:
        st.warning(f"Left out: {p}")
    st.markdown(f"Steering **{effect['n']:,}** neurons: " + "; ".join(effect["labels"]))
    diff = effect["diff"]
    g1, g2 = st.columns(2)
    for col, title, gen, changed in ((g1, "Unsteered", diff.base, diff.base_changed),
                                     (g2, "Steered", diff.steered, diff.steered_changed)):
        with col:
            st.markdown(f"**{title}**")
            st.html(token_spans(gen.tokens, [1.0 if c else 0.0 for c in changed], scale=1.0,
                                titles=[f"{t!r}" + (" · differs" if c else "") for t, c in zip(gen.tokens, changed)]))
    if diff.first_divergence is None:
        st.caption("The two generations are identical.")
    else:
        st.caption(f"They diverge at generated token {diff.first_divergence}; differing tokens are highlighted.")
    rows = effect["probs"]
    field = st.radio("Probability shown", ["prob", "share"], horizontal=True,
                     format_func={"prob": "complete-answer probability", "share": "share among the candidates"}.get,
                     key=widgets.widget_key("steer_prob_field", "prob"))
    widgets.remember("steer_prob_field")
    pc, tc = st.columns(2, gap="medium")
    pc.altair_chart(probability_chart(rows, field), key="steer_probs")
    with tc:
        st.dataframe(pd.DataFrame([{"candidate": r["candidate"], "p before": r["prob_before"], "p after": r["prob_after"],
                                    "share before": r["share_before"], "share after": r["share_after"],
                                    "Δ log p": r["delta_logprob"]} for r in rows]),
                     hide_index=True, key="steer_prob_table",
                     column_config={c: st.column_config.NumberColumn(c, format="%.4f")
                                    for c in ("p before", "p after", "share before", "share after", "Δ log p")})
        after = f"prompt, reply stem “{stem}”" if stem else "prompt"
        st.caption(f"p(the answer is exactly the candidate | {after}): its tokens, then a token "
                   "that ends it, so a longer answer is not penalised for its length and a prefix ('9.2' of "
                   "'9.25') does not collect its continuations.")


# --------------------------------------------------------------------------- the whole UI
def render(res, chat: list[dict]) -> None:
    """The steering UI for ``chat`` (specs, neurons, effect, save/load); writes ``?steer=``."""
    if res.db is None:
        st.warning("Semantic steering needs the neuron database (descriptions to match the concept against): "
                   + (res.dbr.error or res.mismatch or "none is loaded."))
        return
    notice = st.session_state.pop("_steer_notice", None)
    if notice:
        st.success(notice)
    st.caption("Type a concept: the neurons whose descriptions match it best are suppressed (activation ← 0) or "
               "strengthened (← strength × extreme quantile) on the chosen tokens. Several specs combine as a union.")
    t_specs, t_neurons, t_effect, t_share = st.tabs(["Concepts", "Selected neurons", "Effect", "Save / share"])
    with t_specs:
        _draw_form(res)
        _draw_list(res)
        if steering_specs.entries():
            _draw_union(res)
    with t_neurons:
        _draw_neurons(res)
    with t_effect:
        _draw_effect(res, chat)
    with t_share:
        _draw_save_load()
    steering_specs.sync_url()


def _panel(ctx: ChatContext) -> None:
    render(ctx.res, ctx.chat)


register_panel("Semantic steering", _panel, lazy=True, order=20)
