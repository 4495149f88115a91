"""Faithfulness panel on the chat page: does the attribution predict what suppressing a neuron does?

For the top-k attribution cells of the current trace, each is suppressed (set to 0) in its own
row of one batched forward (:func:`engine.effects.faithfulness`) and the measured change of the
attribution objective is plotted against the attribution's linear prediction ``−A``; the
Spearman rank correlation says how far the ranking can be trusted. Points on the diagonal: the
gradient is a good local estimate; far from it: the neuron acts non-linearly (saturating, or
through later layers' non-linearities), and its attribution should be read with care.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import session, widgets
from dashboard.panels import ChatContext, register_panel

DEFAULT_K = 20


def scatter(rows: pd.DataFrame) -> alt.LayerChart:
    """Predicted (x) vs measured (y) Δ objective, with the y = x line."""
    lo = float(min(rows["predicted"].min(), rows["measured"].min(), 0.0))
    hi = float(max(rows["predicted"].max(), rows["measured"].max(), 0.0))
    diag = alt.Chart(pd.DataFrame({"x": [lo, hi], "y": [lo, hi]})).mark_line(strokeDash=[4, 4], color="#9e9e9e").encode(
        x="x:Q", y="y:Q")
    points = alt.Chart(rows).mark_circle(size=70).encode(
        x=alt.X("predicted:Q", title="predicted Δ objective (−attribution)"),
        y=alt.Y("measured:Q", title="measured Δ objective (suppressed)"),
        color=alt.Color("kind:N", title=None),
        tooltip=[alt.Tooltip("group:N"), alt.Tooltip("predicted:Q", format=".4g"), alt.Tooltip("measured:Q", format=".4g")],
    )
    return (diag + points).properties(height=320, description="faithfulness_chart")


def _panel(ctx: ChatContext) -> None:
    from engine.effects import faithfulness

    trace = ctx.trace
    if getattr(trace, "objective", None) is None or not trace.has_attribution:
        st.info("Pick a target token (Attribution mode) to check the attribution against real suppressions.")
        return
    k = st.slider("Top attribution cells to suppress", 5, 100, key=widgets.widget_key("faith_k", DEFAULT_K),
                  help="Each cell is set to 0 in its own forward (batched) and the objective re-measured.")
    widgets.remember("faith_k")
    key = (session.trace_key(ctx.res.lm, ctx.chat, ctx.target), trace.objective.label, int(k))

    def compute():
        bar = st.progress(0.0, text="Suppressing each cell…")
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            bar.progress(min(1.0, done[0] / int(k)), text=f"Suppressed {done[0]} of {int(k)} cells…")

        out = faithfulness(ctx.res.lm, trace, int(k), progress=step)
        bar.empty()
        return out

    report = session.session_memo("faithfulness", key, compute, size=4)
    rows = pd.DataFrame(report.rows)
    st.markdown(f"Objective **{trace.objective.label}**. Spearman rank correlation of predicted and measured "
                f"change over {len(rows)} cells: **ρ = {report.spearman:.3f}** (Pearson r = {report.pearson:.3f}).")
    st.altair_chart(scatter(rows), key="faith_chart")
    st.caption("Dashed line: measured = predicted. The prediction is first order (−activation × gradient); "
               "a neuron far from the line acts non-linearly, so trust its attribution less.")


register_panel("Faithfulness of the attribution", _panel, lazy=True, order=15)
