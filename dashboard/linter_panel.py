"""Concept linter on the chat page: the trace's important neurons grouped into concepts, spurious ones flagged.

Over the neurons that matter in the current trace (the chat page's mode: top attribution
cells toward the target token, or cells at or beyond their extreme quantile),
:func:`concepts.lint.lint_trace` clusters the description embeddings (average linkage on
cosine distance, cut at the threshold, clusters of at least the minimum size), labels
each (c-TF-IDF keywords and the most central description offline; an LLM when
``MONITOR_LLM_*`` is set), ranks them by summed weight and flags the **likely spurious**
ones (:class:`engine.linter.RelevanceCalibration`; the rule is shown in the panel).

With a target (or a contrast, or an answer pair) the **causal check** (on by default) suppresses each
cluster and measures the change of that objective, places it among 20 random neuron sets matched in
size, layers, tokens and activation mass (:func:`engine.linter.causal_check`), sorts the clusters by
measured effect and flags as likely spurious only the unrelated clusters that also move the answer
beyond that null.

Selecting a cluster (a table row or the picker) highlights its tokens in the conversation
and lists its neurons; one button turns it into a steering spec that suppresses exactly
those neurons (:func:`dashboard.steering_specs.add_spec`).
"""

from __future__ import annotations


import altair as alt
import pandas as pd
import streamlit as st

from dashboard import links, resources, session, steering_specs, widgets
from dashboard.highlight import NEG_HEX, POS_HEX, token_spans
from dashboard.panels import ChatContext, register_panel
from engine.errors import MonitorError

DEFAULT_THRESHOLD = 0.6
DEFAULT_MIN_SIZE = 3
DEFAULT_TOP_K = 1000
DEFAULT_PERCENTILE = 90
FLAG_SPURIOUS = "⚠ likely spurious"
FLAG_RELATED = "related"
FLAG_UNKNOWN = "–"


def _flag(c) -> str:
    return FLAG_UNKNOWN if c.spurious is None else FLAG_SPURIOUS if c.spurious else FLAG_RELATED


def lint(ctx: ChatContext, mode: str, threshold: float, min_size: int, k: int, percentile: float,
         causal: bool = False):
    """The :class:`engine.linter.LintReport` of ``ctx.trace``, memoised per session on everything it depends on."""
    from concepts.lint import lint_trace
    from engine.llm_client import read_env

    res = ctx.res
    llm = read_env()[:2]  # the labeler's endpoint and model: a change recomputes
    objective = getattr(getattr(ctx.trace, "objective", None), "label", None)
    key = (session.trace_key(res.lm, ctx.chat, ctx.target), objective, mode, float(threshold), int(min_size), int(k),
           float(percentile), res.dbr.stamp, llm, bool(causal))

    def compute():
        bar = st.progress(0.0, text="Clustering the important neurons' descriptions…") if causal else None
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            bar.progress(min(1.0, done[0] / 200), text=f"Causal check: {done[0]} suppressed forwards measured…")

        with st.spinner("Clustering the important neurons' descriptions…"):
            report = lint_trace(res.db, ctx.trace, mode=mode, k=int(k), threshold=float(threshold),
                                min_size=int(min_size), percentile=float(percentile), labeler="env",
                                embed_fn=resources.embed_query, lm=res.lm if causal else None,
                                causal_progress=step if causal else None)
        if bar is not None:
            bar.empty()
        return report

    return session.session_memo("lint", key, compute, size=4)


def cluster_table(report) -> pd.DataFrame:
    rows = []
    for c in report.clusters:
        source = "LLM" + (f" (coherence {c.coherence}/5)" if c.coherence is not None else "") \
            if c.label_source == "llm" else "c-TF-IDF keywords"
        rows.append({"rank": c.id + 1, "flag": _flag(c), "label": c.label, "label from": source, "size": len(c.members),
                     "weight": c.weight, "relevance": c.relevance, "cohesion": c.cohesion,
                     "measured effect": c.effect, "predicted": c.predicted,
                     "null percentile": None if c.null is None else c.null["percentile"],
                     "moves the answer": c.moves, "what suppressing did": c.effect_text,
                     "keywords": ", ".join(c.keywords), "central description": c.central,
                     "why": c.explanation})
    return pd.DataFrame(rows, columns=["rank", "flag", "label", "label from", "size", "weight", "relevance", "cohesion",
                                       "measured effect", "predicted", "null percentile", "moves the answer",
                                       "what suppressing did", "keywords", "central description", "why"])


def cluster_chart(report, weight_title: str) -> alt.Chart:
    """Clusters' summed weights as bars, coloured by the spurious flag."""
    d = cluster_table(report)
    d["name"] = [f"#{r} {l}"[:60] for r, l in zip(d["rank"], d["label"])]
    domain = [FLAG_SPURIOUS, FLAG_RELATED, FLAG_UNKNOWN]
    return alt.Chart(d).mark_bar().encode(
        x=alt.X("weight:Q", title=weight_title),
        y=alt.Y("name:N", sort=list(d["name"]), title=None, axis=alt.Axis(labelLimit=220, labelOverlap=False)),
        color=alt.Color("flag:N", title=None, scale=alt.Scale(domain=domain, range=[POS_HEX, NEG_HEX, "#9e9e9e"])),
        tooltip=[alt.Tooltip("name:N", title="cluster"), alt.Tooltip("size:Q"), alt.Tooltip("weight:Q", format=".3g"),
                 alt.Tooltip("relevance:Q", format=".3f", title="similarity to the conversation"),
                 alt.Tooltip("flag:N"), alt.Tooltip("central description:N")],
    ).properties(height=alt.Step(26), description="lint_chart")  # per bar: sized right even if drawn hidden


def _on_cluster_row() -> None:
    event = st.session_state.get("lint_clusters")
    try:
        rows = event.selection.rows if event else []
    except AttributeError:
        rows = []
    if rows:
        widgets.set_widget("lint_pick", int(rows[0]))


def _suppress(spec, label: str) -> None:
    if spec in steering_specs.current_specs():
        st.session_state["_lint_notice"] = ("warning", f"{spec.label} is already a steering spec.")
        return
    steering_specs.add_spec(spec)
    st.session_state["_lint_notice"] = (
        "success", f"Added a steering spec that suppresses the {len(spec.neurons)} neurons of “{label}”: see "
                   "Semantic steering below (Effect tab) for what it changes.")


def _panel(ctx: ChatContext) -> None:
    res = ctx.res
    if res.db is None:
        st.info("The concept linter needs the neuron database (description embeddings): "
                + (res.dbr.error or res.mismatch or "none is loaded."))
        return
    mode = "attribution" if ctx.mode == "Attribution" else "activation"
    if mode == "attribution" and getattr(ctx.trace, "attributions", None) is None:
        st.info("Pick a target token to lint the neurons that push it.")
        return
    weight_title = "summed |attribution|" if mode == "attribution" else "summed normalised activation"
    notice = st.session_state.pop("_lint_notice", None)
    if notice:
        getattr(st, notice[0])(notice[1])
    st.caption(f"The {'top attribution cells toward the target token' if mode == 'attribution' else 'neurons at or beyond their extreme quantile'} "
               "(the trace's mode above), clustered by what their descriptions say. Each cluster is a concept the "
               "model used here; flagged ones have little to do with the conversation.")
    c1, c2, c3, c4 = st.columns(4)
    threshold = c1.slider("Cluster threshold (cosine distance)", 0.05, 1.0, step=0.05,
                          key=widgets.widget_key("lint_threshold", DEFAULT_THRESHOLD),
                          help="Average linkage: members of a cluster are on average at most this far apart. Higher "
                               "gives fewer, broader clusters.")
    widgets.remember("lint_threshold")
    min_size = c2.number_input("Minimum cluster size", 2, 50, key=widgets.widget_key("lint_min_size", DEFAULT_MIN_SIZE))
    widgets.remember("lint_min_size")
    k = c3.number_input("Important neurons (top k)", 10, 5000, step=50, key=widgets.widget_key("lint_k", DEFAULT_TOP_K),
                        help="Attribution: the top k (layer, token, neuron) cells. Activation: at most k neurons.")
    widgets.remember("lint_k")
    pct = c4.slider("Spurious percentile", 50, 99, key=widgets.widget_key("lint_pct", DEFAULT_PERCENTILE),
                    help="A cluster is flagged when it is less related to the conversation than this percentile of "
                         "random neuron descriptions.")
    widgets.remember("lint_pct")
    can_check = getattr(ctx.trace, "objective", None) is not None
    causal = st.toggle("Causal check: suppress each cluster, compare with 20 matched random sets",
                       key=widgets.widget_key("lint_causal", True), disabled=not can_check,
                       help="Measures what suppressing each cluster does to the attribution objective, and where that "
                            "falls among random neuron sets matched in size, layers, tokens and activation mass. "
                            "Needs a target (Attribution mode).")
    widgets.remember("lint_causal")

    report = lint(ctx, mode, threshold, min_size, k, pct, causal=bool(causal and can_check))
    n_spurious = sum(bool(c.spurious) for c in report.clusters)
    st.markdown(f"**{report.n_hits:,}** important neurons, **{report.n_described:,}** with a description → "
                f"**{len(report.clusters)}** clusters of ≥ {report.min_size} (average linkage, cosine distance ≤ "
                f"{report.threshold:g}), ranked by {weight_title}; **{n_spurious}** flagged likely spurious.")
    for w in report.warnings:
        st.caption(w)
    if report.rule:
        rule = report.rule
        if report.causal:
            rule += (f" With the causal check, a cluster is flagged only when it is also **moving the answer**: "
                     f"suppressing it changes {report.causal['objective']} by more than random neuron sets matched "
                     f"in size, layers, tokens and activation mass do (one-sided empirical p ≤ "
                     f"{report.causal['alpha']:g} among {report.causal['n_null']}). Clusters are sorted by measured effect.")
        st.info("**How “likely spurious” is decided.** " + rule, icon=":material/help:")
    if not report.clusters:
        st.info(f"No cluster of {report.min_size} or more neurons: raise the threshold or lower the minimum size.")
        return

    st.dataframe(cluster_table(report), hide_index=True, key="lint_clusters", on_select=_on_cluster_row,
                 selection_mode="single-row", height=min(400, 38 + 35 * len(report.clusters)), column_config={
                     "rank": st.column_config.NumberColumn("#", width="small"),
                     "weight": st.column_config.NumberColumn(weight_title, format="%.3g"),
                     "relevance": st.column_config.NumberColumn("similarity to conversation", format="%.3f"),
                     "cohesion": st.column_config.NumberColumn("cohesion", format="%.2f"),
                     "measured effect": st.column_config.NumberColumn(
                         "measured effect", format="%.3g", help="Change of the objective when the cluster is suppressed."),
                     "predicted": st.column_config.NumberColumn(
                         "predicted (−Σ attribution)", format="%.3g", help="The attribution's linear estimate."),
                     "null percentile": st.column_config.NumberColumn(
                         "null percentile", format="%.0f", help="Where |measured effect| falls among matched random sets."),
                     "what suppressing did": st.column_config.TextColumn(width="large"),
                     "central description": st.column_config.TextColumn(width="large"),
                     "why": st.column_config.TextColumn(width="large"),
                 })
    st.altair_chart(cluster_chart(report, weight_title), key="lint_chart")

    ids = [c.id for c in report.clusters]
    if st.session_state.get("w_lint_pick") not in ids:
        widgets.set_widget("lint_pick", ids[0])
    labels = {c.id: f"#{c.id + 1} {c.label} · {len(c.members)} neurons · {_flag(c)}" for c in report.clusters}
    pick = st.selectbox("Cluster (or click a table row)", ids, format_func=labels.get,
                        key=widgets.widget_key("lint_pick", ids[0]))
    widgets.remember("lint_pick")
    cluster = report.clusters[ids.index(pick)]
    if cluster.spurious:
        st.warning(cluster.explanation)
    elif cluster.spurious is not None:
        st.success(cluster.explanation)
    if cluster.effect_text:
        st.markdown(f"**What suppressing it did:** {cluster.effect_text}")
    tokens = ctx.trace.tokens
    tw = cluster.tokens
    values = [tw.get(i, 0.0) for i in range(len(tokens))]
    st.markdown(f"**Tokens of cluster #{cluster.id + 1}** (shaded by the cluster's summed weight on each):")
    st.html(token_spans(tokens, values, titles=[f"{i}: {t!r}  weight {values[i]:.3g}" for i, t in enumerate(tokens)]))
    members = pd.DataFrame([{"layer": h.layer, "neuron": h.neuron, "polarity": "positive" if h.polarity > 0 else "negative",
                             "weight": h.weight, "tokens": ", ".join(str(t) for t in sorted(h.tokens)[:12]),
                             "summary": s, "url": links.neuron_url(h.layer, h.neuron)}
                            for h, s in zip(cluster.members, cluster.summaries)])
    st.dataframe(members, hide_index=True, key="lint_neurons", height=min(320, 38 + 35 * len(members)), column_config={
        "weight": st.column_config.NumberColumn(weight_title, format="%.3g"),
        "tokens": st.column_config.TextColumn("token indices"),
        "summary": st.column_config.TextColumn(width="large"),
        "url": st.column_config.LinkColumn("neuron page", display_text="open ↗", width="small"),
    })
    try:
        spec = cluster.to_spec()
    except MonitorError as err:
        st.error(str(err))
        return
    st.button(f"Suppress these {len(cluster.members)} neurons (add a steering spec)", key="lint_to_spec",
              on_click=_suppress, args=(spec, cluster.label), icon=":material/block:", type="primary",
              help="Adds a spec that suppresses exactly this cluster's neurons on the last user turn.")


register_panel("Concept linter", _panel, lazy=True, order=10)  # clustering costs: only while open
