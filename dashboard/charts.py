"""Altair charts of the dashboard. Each function returns an ``alt.Chart`` (no Streamlit calls).

Colours: positive polarity red, negative blue (the same as the HTML highlighting), drawn as
translucent fills under the theme's text colour, so charts read in light and dark themes.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd

from .highlight import NEG_HEX, POS_HEX

POLARITY_DOMAIN = ["positive", "negative"]
POLARITY_RANGE = [POS_HEX, NEG_HEX]
TARGET_HEX = "#f0a202"
TEXT_LIGHT_THEME = "#31333f"  # Streamlit's text colours
TEXT_DARK_THEME = "#fafafa"
TOKEN_SELECTION = "tok"  # name of the click selection on the token chart

# Token chart layout, in pixels: a monospace grid that wraps like text.
_CHAR_W = 7.4
_PAD = 5.0
_ROW_H = 24.0
_LINE_W = 800.0


def unvalidated(chart):
    """``chart`` with its JSON-schema validation skipped when Streamlit serialises it.

    Altair validates the whole spec in ``to_dict()`` (~25 ms a chart here, most of a display
    rerun's chart cost). The builders below are validated by the unit tests instead.
    """
    object.__setattr__(chart, "to_dict", partial(chart.to_dict, validate=False))
    return chart


def polarity_name(p) -> str:
    return "positive" if int(p) > 0 else "negative"


def _show(tok: str) -> str:
    return tok.replace("\n", "↵").replace("\t", "→") if tok else "∅"


def token_layout(tokens: Sequence[str], line_width: float = _LINE_W) -> pd.DataFrame:
    """x0, x1, y0, y1 of each token's box: left to right, wrapping at ``line_width`` and after newlines."""
    rows, x, y = [], 0.0, 0.0
    for i, tok in enumerate(tokens):
        shown = _show(tok)
        w = max(1, len(shown)) * _CHAR_W + _PAD
        if x > 0 and x + w > line_width:
            x, y = 0.0, y + _ROW_H
        rows.append((i, shown, x, x + w - 2, y, y + _ROW_H - 4))
        x += w
        if tok.endswith("\n"):
            x, y = 0.0, y + _ROW_H
    return pd.DataFrame(rows, columns=["pos", "text", "x0", "x1", "y0", "y1"])


def token_chart(tokens: Sequence[str], top_next: Sequence[Sequence[tuple[str, float]]] | None = None,
                token_prob: Sequence[float | None] | None = None, values: Sequence[float] | None = None,
                value_title: str = "activation", target: int | None = None,
                dark: bool = False) -> tuple[pd.DataFrame, dict]:
    """The conversation's tokens as a wrapped, clickable grid: (data, Vega-Lite spec) for
    ``st.vega_lite_chart(data, spec)``.

    Fill: ``values`` (the selected neuron's activation, red positive / blue negative, opacity
    ∝ |value| / max |value|); none when ``values`` is None. Text takes the theme's text colour
    (``dark``: Vega draws text black unless told). The ``target`` token is outlined in
    orange. Hover shows the token, p(token | prefix) and the top-5 next tokens after it; a click
    selects the token (selection ``tok``, field ``pos``).

    Written as a plain spec, not Altair: building this layered chart with Altair validated each
    encoding and cost ~50-100 ms per rerun; the unit tests validate the spec against the schema.
    """
    df = token_layout(tokens)
    n = len(df)
    df["p"] = ["–" if token_prob is None or token_prob[i] is None else f"{float(token_prob[i]):.3f}"
               for i in range(n)]
    df["next5"] = ["  ·  ".join(f"{_show(t)!r} {p:.2f}" for t, p in (top_next[i] if top_next else [])) or "–"
                   for i in range(n)]
    vals = np.zeros(n) if values is None else np.nan_to_num(np.asarray(values, dtype=np.float64)[:n])
    scale = float(np.max(np.abs(vals))) if n and np.any(vals) else 1.0
    df["value"] = np.round(vals, 4)
    df["strength"] = np.abs(vals) / scale if values is not None else 0.0
    df["polarity"] = np.where(vals >= 0, "positive", "negative")
    df["is_target"] = [i == target for i in range(n)]
    df["label"] = [f"{i}: {t!r}" for i, t in zip(df["pos"], df["text"])]
    height = float(df["y1"].max() + 4) if n else _ROW_H
    width = float(min(_LINE_W, df["x1"].max() + 4)) if n else _LINE_W
    tooltip = [{"field": "label", "type": "nominal", "title": "token"},
               {"field": "p", "type": "nominal", "title": "p(token | before)"},
               {"field": "next5", "type": "nominal", "title": "top-5 next tokens"}]
    if values is not None:
        tooltip.append({"field": "value", "type": "quantitative", "title": value_title, "format": "+.3f"})
    position = {
        "x": {"field": "x0", "type": "quantitative", "axis": None,
              "scale": {"domain": [0, width], "range": [0, width], "nice": False, "zero": False}},
        "y": {"field": "y0", "type": "quantitative", "axis": None,
              "scale": {"domain": [0, height], "range": [0, height], "nice": False, "zero": False}},
        "tooltip": tooltip,
    }
    boxes = {
        "mark": {"type": "rect", "cornerRadius": 3, "cursor": "pointer"},
        "params": [{"name": TOKEN_SELECTION, "select": {"type": "point", "fields": ["pos"], "on": "click"}}],
        "encoding": {
            **position,
            "x2": {"field": "x1"}, "y2": {"field": "y1"},
            "color": {"field": "polarity", "type": "nominal", "legend": None,
                      "scale": {"domain": POLARITY_DOMAIN, "range": POLARITY_RANGE}},
            "fillOpacity": {"field": "strength", "type": "quantitative", "legend": None,
                            "scale": {"domain": [0, 1], "range": [0.04, 0.85]}},
            "stroke": {"condition": {"test": "datum.is_target", "value": TARGET_HEX},
                       "value": "rgba(128,128,128,0.45)"},
            "strokeWidth": {"condition": {"test": "datum.is_target", "value": 2.5}, "value": 0.6},
        },
    }
    text = {
        "mark": {"type": "text", "align": "left", "baseline": "middle", "dx": _PAD / 2, "dy": (_ROW_H - 4) / 2,
                 "font": "monospace", "fontSize": 12, "cursor": "pointer",
                 "color": TEXT_DARK_THEME if dark else TEXT_LIGHT_THEME},
        "encoding": {**position, "text": {"field": "text", "type": "nominal"}},
    }
    spec = {"description": "token_chart", "width": width, "height": height, "layer": [boxes, text]}
    return df, spec


def heatmap(df: pd.DataFrame, tokens: Sequence[str], field: str, title: str, n_layers: int) -> alt.Chart:
    """Layer (rows, 0 at the top) × token (columns) of ``field`` from a long table
    (layer, token_index, ``field``); empty cells (0) are left blank."""
    d = df[df[field] > 0].copy()
    d["token"] = [f"{i}: {_show(tokens[i])}" for i in d["token_index"]]
    order = [f"{i}: {_show(t)}" for i, t in enumerate(tokens)]
    present = set(d["token"])
    domain = [t for t in order if t in present] or order[:1]
    return alt.Chart(d).mark_rect().encode(
        x=alt.X("token:N", sort=domain, scale=alt.Scale(domain=domain), title="token",
                axis=alt.Axis(labelAngle=-60, labelLimit=90, labelOverlap=True)),
        y=alt.Y("layer:O", title="layer", scale=alt.Scale(domain=list(range(n_layers)))),
        color=alt.Color(f"{field}:Q", title=title, scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip("token:N"), alt.Tooltip("layer:O"), alt.Tooltip(f"{field}:Q", title=title, format=".3g")],
    ).properties(height=max(220, 12 * n_layers), description="heatmap")


def top_bar(rows: pd.DataFrame, n: int, value_title: str) -> alt.Chart:
    """The ``n`` strongest rows as horizontal bars (signed value), coloured by polarity."""
    d = rows.head(n).copy()
    d["neuron_id"] = [f"L{l}/N{i} @{t}" for l, i, t in zip(d["layer"], d["neuron"], d["token_index"])]
    d["polarity_name"] = [polarity_name(p) for p in d["polarity"]]
    d["summary"] = d["summary"].fillna("not described") if "summary" in d else "not described"
    return alt.Chart(d).mark_bar().encode(
        x=alt.X("value:Q", title=value_title),
        y=alt.Y("neuron_id:N", sort=list(d["neuron_id"]), title=None,
                axis=alt.Axis(labelLimit=170, labelOverlap=False)),
        color=alt.Color("polarity_name:N", title="polarity",
                        scale=alt.Scale(domain=POLARITY_DOMAIN, range=POLARITY_RANGE)),
        tooltip=[alt.Tooltip("neuron_id:N", title="neuron @token"), alt.Tooltip("token:N"),
                 alt.Tooltip("value:Q", format="+.3g", title=value_title), alt.Tooltip("summary:N")],
    ).properties(height=max(160, 21 * len(d)), description="top_bar")


def activation_histogram(values: pd.DataFrame, quantiles: dict[str, float]) -> alt.LayerChart:
    """Histogram of activations (``values``: columns value, group), square-root count axis, with
    the named quantiles as vertical rules."""
    bars = alt.Chart(values).mark_bar(opacity=0.7).encode(
        x=alt.X("value:Q", bin=alt.Bin(maxbins=60), title="activation"),
        y=alt.Y("count():Q", stack=None, scale=alt.Scale(type="sqrt"), title="tokens (√ scale)"),
        color=alt.Color("group:N", title="tokens from",
                        scale=alt.Scale(domain=["top exemplars", "bottom exemplars", "random exemplars"],
                                        range=[POS_HEX, NEG_HEX, "#9a9a9a"])),
        tooltip=[alt.Tooltip("group:N"), alt.Tooltip("count():Q", title="tokens")],
    )
    q = pd.DataFrame({"name": list(quantiles), "value": list(quantiles.values())})
    rules = alt.Chart(q).mark_rule(strokeDash=[4, 3], color=TARGET_HEX).encode(
        x="value:Q", tooltip=[alt.Tooltip("name:N", title="quantile"), alt.Tooltip("value:Q", format=".4g")])
    return alt.layer(bars, rules).properties(height=240, description="histogram")


def search_scatter(results: pd.DataFrame, n_layers: int) -> alt.Chart:
    """Where search results sit: layer × score, coloured by polarity, sized by similarity;
    a click opens the neuron page."""
    d = results.copy()
    d["polarity_name"] = [polarity_name(p) for p in d["polarity"]]
    d["neuron_id"] = [f"L{l}/N{n}" for l, n in zip(d["layer"], d["neuron"])]
    d["similarity"] = d["similarity"].fillna(0.5) if "similarity" in d else 0.5
    return alt.Chart(d).mark_circle(opacity=0.8, cursor="pointer").encode(
        x=alt.X("layer:Q", scale=alt.Scale(domain=[0, max(n_layers - 1, 1)]), title="layer"),
        y=alt.Y("score:Q", title="description score"),
        color=alt.Color("polarity_name:N", title="polarity", scale=alt.Scale(domain=POLARITY_DOMAIN, range=POLARITY_RANGE)),
        size=alt.Size("similarity:Q", title="similarity", scale=alt.Scale(range=[30, 260])),
        href="url:N",
        tooltip=[alt.Tooltip("neuron_id:N", title="neuron"), alt.Tooltip("polarity_name:N", title="polarity"),
                 alt.Tooltip("score:Q", format=".3f"), alt.Tooltip("similarity:Q", format=".3f"),
                 alt.Tooltip("summary:N")],
    ).properties(height=280, description="browse_chart")
