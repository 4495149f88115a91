"""Neuron page (``?layer=L&neuron=N``): descriptions, exemplars, quantiles, output tokens, live activation, neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, highlight, links, resources, score_badges, session
from engine.errors import MonitorError

EXEMPLARS_SHOWN = 8

res = resources.resources()
lm, db = res.lm, res.db
n_layers = db.n_layers if db is not None else (lm.n_layers if lm is not None else None)
n_neurons = db.n_neurons if db is not None else (lm.n_neurons if lm is not None else None)

st.title("Neuron")


def _parse(name: str) -> tuple[int | None, str | None]:
    raw = st.query_params.get(name)
    if raw is None or str(raw).strip() == "":
        return None, None
    try:
        return int(str(raw).strip()), None
    except ValueError:
        return None, f"`{name}={str(raw)[:40]}` in the address is not a whole number."


layer, err_l = _parse("layer")
neuron, err_n = _parse("neuron")


def _go() -> None:
    st.query_params.from_dict({"layer": str(st.session_state["goto_layer"]),
                               "neuron": str(st.session_state["goto_neuron"])})


with st.sidebar:
    st.subheader("Go to a neuron")
    if n_layers:
        if st.session_state.get("_goto_for") != (layer, neuron) or "goto_layer" not in st.session_state:
            st.session_state["_goto_for"] = (layer, neuron)
            st.session_state["goto_layer"] = min(max(layer or 0, 0), n_layers - 1)
            st.session_state["goto_neuron"] = min(max(neuron or 0, 0), n_neurons - 1)
        st.number_input("Layer", 0, n_layers - 1, key="goto_layer")
        st.number_input("Neuron", 0, n_neurons - 1, key="goto_neuron")
        st.button("Open", on_click=_go, icon=":material/arrow_forward:", key="goto")

if n_layers is None:
    st.error("Neither a model nor a neuron database is loaded, so there is no neuron to show.")
    if res.dbr.error:
        st.error(res.dbr.error)
    if res.model.error:
        st.error(res.model.error)
    st.stop()

for e in (err_l, err_n):
    if e:
        st.error(f"{e} Use `?layer=L&neuron=N`, e.g. `?layer=8&neuron=5`.")
if err_l or err_n:
    st.stop()
if layer is None or neuron is None:
    st.info("Pick a neuron in the sidebar, open one from the chat page's table or the database browser, "
            "or use the address `?layer=L&neuron=N`.")
    st.stop()
try:
    if db is not None:
        db.check_neuron(layer, neuron)
    else:
        lm.check_neuron(layer, neuron)
except MonitorError as err:
    st.error(f"{err} Pick one in the sidebar.")
    st.stop()

st.header(f"Layer {layer} · neuron {neuron}", anchor=False)
if res.dbr.error:
    st.warning(res.dbr.error)
elif res.mismatch:
    st.warning(res.mismatch)
imported = resources.import_note(db)
if imported:
    st.info(imported, icon=":material/input:")

info = None
scores = None
if db is not None:
    try:
        info = db.neuron(layer, neuron)
        scores = db.scores_for(layer, neuron)
    except MonitorError as err:
        st.error(str(err))

# --------------------------------------------------------------------------- descriptions
described = resources.described_layers(db)
if info is not None:
    descs = info["descriptions"]
    if not descs:
        covered = ", ".join(str(x) for x in described) if described else "none"
        note = db.undescribed_note(layer) or f"Layer {layer} is not described in this database (described layers: {covered})."
        st.info(f"{note} Exemplars, quantiles and output tokens below still come from the database.")
    c_pos, c_neg = st.columns(2, gap="large")
    for col, pol, name in ((c_pos, 1, "Positive polarity (fires high)"), (c_neg, -1, "Negative polarity (fires low)")):
        with col, st.container(border=True):
            st.markdown(f"**{name}**")
            d = descs.get(pol)
            if d is None:
                st.caption("not described")
                continue
            m1, m2 = st.columns(2)
            main = d.get("scorer") or db.meta.get("scorer", "")
            m1.metric("score", f"{d['score']:.2f}" if d["score"] is not None else "unscored",
                      help=f"The main score ({score_badges.label(main)}): {score_badges.meaning(main)}")
            m2.metric("explainer", d["explainer"])
            st.markdown(f"_{d['summary']}_")
            st.write(d["text"])
            rows = scores[scores["polarity"] == pol] if scores is not None else []
            for r in (rows.itertuples() if len(rows) else []):
                value = None if pd.isna(r.value) else float(r.value)
                st.markdown(score_badges.badge_markdown(r.scorer, value),
                            help=f"{score_badges.meaning(r.scorer)} Scorer {r.scorer} v{r.version}, measured on "
                                 f"{r.split} data ({'?' if pd.isna(r.n) else int(r.n)} sequences).")
    if scores is not None and len(scores):
        with st.expander(f"Every score of these descriptions ({len(scores)})"):
            shown_scores = scores.assign(polarity=[charts.polarity_name(p) for p in scores["polarity"]])
            st.dataframe(shown_scores[["polarity", "scorer", "version", "value", "split", "n", "detail"]],
                         hide_index=True, key="all_scores",
                         column_config={"value": st.column_config.NumberColumn(format="%.3f"),
                                        "detail": st.column_config.TextColumn(width="large")})
            st.caption("split 'source': as the publisher released it; 'test': measured here on held-out text. "
                       "Scores of different scorers are not comparable.")

# --------------------------------------------------------------------------- live activation on the conversation
st.subheader("On the current conversation")
view = resources.get_view(res)
if res.browse_only:
    st.info(res.browse_only)
elif lm is None:
    st.caption(f"The model is not loaded ({res.model.error}), so there is no live activation.")
elif not session.has_conversation():
    st.info("No conversation in this session yet: chat on the main page, then come back to see this neuron live.")
    st.page_link(links.PAGE_CHAT, label="Go to the chat", icon=":material/forum:")
else:
    try:
        trace = session.get_trace(lm, session.chat_for_model())
    except MonitorError as err:
        st.error(str(err))
        trace = None
    if trace is not None:
        a = trace.neuron_row("activations", layer, neuron).numpy().astype(np.float64)  # [tokens]
        if view is not None:
            normed = view.value(layer, neuron, a)
        else:
            normed = a
        rest = np.abs(normed[1:]) if len(normed) > 1 else np.abs(normed)
        k = int(np.argmax(rest)) + (1 if len(normed) > 1 else 0)
        m1, m2, m3 = st.columns(3)
        m1.metric("most extreme token (token 0 excluded)", highlight.token_label(k, trace.tokens[k]))
        m2.metric("activation there", f"{a[k]:+.3g}")
        m3.metric("÷ extreme quantile" if view is not None else "normalised", f"{normed[k]:+.2f}" if view is not None
                  else "needs the database")
        titles = [f"{i}: {t!r}  activation {v:+.3g}" + (f"  (÷ quantile {q:+.2f})" if view is not None else "")
                  for i, (t, v, q) in enumerate(zip(trace.tokens, a, normed))]
        st.html(highlight.token_spans(trace.tokens, normed, scale=max(1.0, float(np.max(np.abs(normed[1:])))
                                                                      if len(normed) > 1 else 1.0),
                                      mark=k, titles=titles,
                                      meta="Red: positive, blue: negative; full colour at the neuron's extreme "
                                           "quantile (or this conversation's max, if larger). Token 0 is the "
                                           "attention sink."))

if info is None:
    st.stop()

# --------------------------------------------------------------------------- exemplars
st.subheader("Exemplars")
qs = info["quantiles"]
scale = max(abs(qs.get(1.0, 0.0)), abs(qs.get(0.0, 0.0))) or None
groups = {
    "Top (positive)": [e for e in info["exemplars"] if e["polarity"] == 1],
    "Bottom (negative)": [e for e in info["exemplars"] if e["polarity"] == -1],
    "Random": [e for e in info["exemplars"] if e["polarity"] == 0],
}
tabs = st.tabs([f"{k} · {len(v)}" for k, v in groups.items()])
for tab, (name, exs) in zip(tabs, groups.items()):
    with tab:
        if not exs:
            st.caption("none stored")
            continue
        if any(e["acts"] is None for e in exs):
            st.caption("No per-token activations in this database: the text and its peak activation only, so "
                       "the tokens cannot be highlighted.")
        for j, e in enumerate(exs):
            if j == EXEMPLARS_SHOWN:
                more = st.expander(f"{len(exs) - EXEMPLARS_SHOWN} more")
            target = more if j >= EXEMPLARS_SHOWN else st
            peak = "peak" if e["acts"] is None else "max"
            meta = f"{e['split']} #{e['rank']} · {e['source'] or '?'} · {peak} {e['max_act']:+.3g}"
            if e["acts"] is None:
                target.html(highlight.plain_text(e["text"], meta=meta))
            else:
                target.html(highlight.token_spans(e["tokens"], e["acts"], scale=scale, meta=meta))

# --------------------------------------------------------------------------- distribution
st.subheader("Activation distribution")
qc, hc = st.columns([1, 2], gap="large")
with qc:
    qdf = pd.DataFrame({"quantile": [f"{q:.10g}" for q in qs], "activation": list(qs.values())})
    st.dataframe(qdf, hide_index=True, key="quantiles",
                 column_config={"activation": st.column_config.NumberColumn(format="%.4g")})
    st.caption(("Quantiles as the source published them, over its own corpus" if imported else
                "Quantiles over every corpus token") + " (0 and 1 are the min and max). The dashboard normalises by "
               "1 − 1e-5 (positive) and 1e-5 (negative), or the nearest stored level on that side.")
with hc:
    parts = []
    for name, exs in (("random exemplars", groups["Random"]), ("top exemplars", groups["Top (positive)"]),
                      ("bottom exemplars", groups["Bottom (negative)"])):
        vals = [v for e in exs for v in e["acts"] or []]
        if vals:
            parts.append(pd.DataFrame({"value": vals, "group": name}))
    if parts:
        lines = {k: v for k, v in (("1e-5", qs.get(1e-5)), ("1 − 1e-5", qs.get(1 - 1e-5))) if v is not None}
        hist = charts.activation_histogram(pd.concat(parts, ignore_index=True), lines)
        st.altair_chart(charts.unvalidated(hist), key="histogram")
        st.caption("Per-token activations of the stored exemplars; random exemplars approximate the usual "
                   "distribution. Dashed lines: the normalising quantiles.")
    else:
        st.caption("No per-token activations are stored for this neuron, so there is no histogram.")

# --------------------------------------------------------------------------- output tokens
st.subheader("Output tokens")
if imported and not (info["promotes"] or info["suppresses"]):
    st.caption("The source did not publish output tokens for this neuron.")
oc1, oc2 = st.columns(2, gap="large")
oc1.html(highlight.chips(info["promotes"], "Promoted when it fires positive (suppressed when negative)"))
oc2.html(highlight.chips(info["suppresses"], "Suppressed when it fires positive (promoted when negative)"))

# --------------------------------------------------------------------------- neighbours
st.subheader("Neighbours by description")
descs = info["descriptions"]
if not descs:
    st.caption("not described, so there are no description neighbours.")
else:
    ncols = st.columns(len(descs), gap="large")
    for col, pol in zip(ncols, sorted(descs, reverse=True)):
        with col:
            st.markdown(f"**Nearest to the {charts.polarity_name(pol)} description**")
            try:
                near = db.nearest_neurons(layer, neuron, pol, k=8)
            except MonitorError as err:
                st.caption(str(err))
                continue
            near["polarity"] = [charts.polarity_name(p) for p in near["polarity"]]
            near["url"] = [links.neuron_url(l, n) for l, n in zip(near["layer"], near["neuron"])]
            st.dataframe(near[["layer", "neuron", "polarity", "similarity", "summary", "url"]], hide_index=True,
                         key=f"neighbours_{pol}",
                         column_config={"similarity": st.column_config.NumberColumn(format="%.3f"),
                                        "summary": st.column_config.TextColumn(width="large"),
                                        "url": st.column_config.LinkColumn("page", display_text="open ↗")})
            first = near.iloc[0] if len(near) else None
            if first is not None:
                st.page_link(links.PAGE_NEURON, label=f"Go to the nearest: L{first['layer']}/N{first['neuron']}",
                             query_params=links.neuron_query(first["layer"], first["neuron"]),
                             icon=":material/arrow_forward:")
