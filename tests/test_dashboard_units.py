"""The dashboard's pure parts, on hand-made tensors: normalisation, ranking, heatmaps, HTML, token layout."""

from __future__ import annotations

import sys
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboard import charts, highlight, ranking  # noqa: E402
from engine.activation_view import normalise, quantile_scales, top_cells  # noqa: E402


def test_quantile_scales_guard_zero_tiny_wrong_sign_and_missing():
    q_hi = np.array([[2.0, 0.0, 2.0, -0.5, np.nan], [4.0, 1e-9, 4.0, 4.0, 4.0]], np.float32)
    q_lo = np.array([[-1.0, -3.0, 0.0, 0.2, np.nan], [-2.0, -2.0, -1e-9, -2.0, -2.0]], np.float32)
    pos, neg = quantile_scales(q_hi, q_lo, rel_floor=0.05, abs_floor=1e-4)
    # positive side: floor = 5% of the layer's median positive divisor (2.0 and 4.0)
    assert pos[0, :4].tolist() == pytest.approx([2.0, 0.1, 2.0, 0.1])
    assert pos[1].tolist() == pytest.approx([4.0, 0.2, 4.0, 4.0, 4.0])
    # negative side divides by −Q(1e-5); medians 2.0 (of 1, 3) and 2.0
    assert neg[0, :4].tolist() == pytest.approx([1.0, 3.0, 0.1, 0.1])
    assert neg[1].tolist() == pytest.approx([2.0, 2.0, 0.1, 2.0, 2.0])
    # a neuron the database lacks never ranks: its divisor is infinite
    assert np.isinf(pos[0, 4]) and np.isinf(neg[0, 4])


def test_normalise_divides_each_side_by_its_quantile_and_keeps_the_sign():
    acts = torch.tensor([[[3.0, -3.0], [0.5, -0.5]]])  # [1 layer, 2 tokens, 2 neurons]
    pos = np.array([[2.0, 6.0]], np.float32)
    neg = np.array([[1.5, 0.25]], np.float32)
    n = normalise(acts, (pos, neg))
    assert n[0].flatten().tolist() == pytest.approx([1.5, -12.0, 0.25, -2.0])
    assert torch.equal(normalise(acts, None), acts)


def _trace(acts, attr=None, target_prob=None):
    """A whole (dense) trace holding these tensors."""
    from engine.trace import Trace

    return Trace(rendered=None, activations=acts, top_next=[], next_token_prob=[], attributions=attr,
                 target_prob=target_prob)


def test_activation_rows_one_row_per_neuron_at_its_extreme_token():
    norm = torch.zeros(2, 4, 3)  # [layers, tokens, neurons]
    norm[0, 0, 0] = 50.0  # the sink
    norm[0, 2, 0] = 1.5
    norm[0, 3, 0] = -1.2
    norm[1, 1, 2] = -3.0
    norm[1, 3, 1] = 0.9  # under the threshold
    acts = norm * 10
    view = (np.full((2, 3), 10, np.float32), np.full((2, 3), 10, np.float32))  # n = a ÷ 10
    T = _trace(acts)
    rows, total = ranking.activation_rows(T, view, threshold=1.0, skip_sink=True)
    assert total == 2
    assert rows[["layer", "neuron", "token_index", "polarity"]].values.tolist() == [[1, 2, 1, -1], [0, 0, 2, 1]]
    assert rows["value"].tolist() == pytest.approx([-3.0, 1.5])
    assert rows["activation"].tolist() == pytest.approx([-30.0, 15.0])
    rows, total = ranking.activation_rows(T, view, threshold=1.0, skip_sink=False)
    assert rows.iloc[0][["layer", "neuron", "token_index"]].tolist() == [0, 0, 0] and total == 2
    rows, total = ranking.activation_rows(T, view, threshold=0.5, skip_sink=True, limit=2)
    assert total == 3 and len(rows) == 2


def test_attribution_rows_match_the_engine_top_cells():
    g = torch.Generator().manual_seed(0)
    attr = torch.randn(3, 5, 7, generator=g)
    acts = torch.randn(3, 5, 7, generator=g)
    rows = ranking.attribution_rows(_trace(acts, attr), "logprob", k=20, skip_sink=False)
    ref = top_cells(attr, 20, ())
    assert rows[["layer", "token_index", "neuron"]].values.tolist() == [[c["layer"], c["token_index"], c["neuron"]]
                                                                          for c in ref]
    assert rows["value"].tolist() == pytest.approx([c["value"] for c in ref])
    expected_pol = [1 if acts[c["layer"], c["token_index"], c["neuron"]] >= 0 else -1 for c in ref]
    assert rows["polarity"].tolist() == expected_pol
    skipped = ranking.attribution_rows(_trace(acts, attr), "logprob", k=20, skip_sink=True)
    assert (skipped["token_index"] != 0).all() and len(skipped) == 20


def test_attribution_prob_is_logprob_times_target_probability():
    T = _trace(torch.tensor([[[1.0, 1.0], [1.0, -1.0]]]), torch.tensor([[[0.0, 0.0], [2.0, -4.0]]]), 0.25)
    assert ranking.attribution_rows(T, "prob", skip_sink=False)["value"].tolist() == [-1.0, 0.5]
    assert ranking.attribution_rows(T, "logprob", skip_sink=False)["value"].tolist() == [-4.0, 2.0]
    assert ranking.attribution_heatmap(T, "prob", pd.DataFrame({"layer": [], "token_index": []}),
                                       skip_sink=False)["sum_abs"].tolist() == [0.0, 1.5]


def test_heatmaps_sum_and_count():
    norm = torch.tensor([[[2.0, -0.5, 1.0], [0.2, 0.1, -3.0]]])  # [1, 2 tokens, 3 neurons]
    heat = ranking.activation_heatmap(_trace(norm), None, threshold=1.0, skip_sink=False)
    assert heat["sum_abs"].tolist() == pytest.approx([3.0, 3.0])
    assert heat["count"].tolist() == [2, 1]
    assert ranking.activation_heatmap(_trace(norm), None, 1.0, skip_sink=True)["token_index"].tolist() == [1]
    attr = torch.tensor([[[1.0, -2.0], [0.5, 0.5]]])
    rows = pd.DataFrame({"layer": [0, 0], "token_index": [0, 0]})
    ah = ranking.attribution_heatmap(_trace(attr, attr), "logprob", rows, skip_sink=False)
    assert ah["sum_abs"].tolist() == pytest.approx([3.0, 1.0]) and ah["count"].tolist() == [2, 0]


def test_join_descriptions_picks_the_rows_polarity():
    rows = pd.DataFrame({"layer": [0, 1], "neuron": [5, 6], "polarity": [1, -1], "token_index": [1, 2],
                         "value": [2.0, -2.0], "activation": [1.0, -1.0]})
    desc = pd.DataFrame({"layer": [0, 1], "neuron": [5, 6], "description_pos": ["fires A", "fires B"],
                         "summary_pos": ["A", "B"], "score_pos": [0.5, 0.6], "description_neg": ["neg A", None],
                         "summary_neg": ["nA", None], "score_neg": [0.1, np.nan]})
    out = ranking.join_descriptions(rows, desc)
    assert out["description"].iloc[0] == "fires A" and pd.isna(out["description"].iloc[1])
    assert out["summary"].iloc[0] == "A" and pd.isna(out["summary"].iloc[1])
    assert out["score"].iloc[0] == 0.5 and np.isnan(out["score"].iloc[1])


def test_keyword_filter_is_literal_and_case_insensitive():
    df = pd.DataFrame({"description": ["Bible verses (KJV)", "dates", None], "summary": ["x", "y", "z"],
                       "token": ["1: 'a'", "2: 'b'", "3: '('"]})
    assert ranking.keyword_filter(df, "bible")["description"].tolist() == ["Bible verses (KJV)"]
    assert len(ranking.keyword_filter(df, "(")) == 2  # a regex metacharacter, matched literally
    assert len(ranking.keyword_filter(df, ".*")) == 0
    assert len(ranking.keyword_filter(df, "  ")) == 3


def test_token_spans_escape_text_and_titles():
    out = highlight.token_spans(["<script>", "alert(\"x\")", "</script>\n", "&amp;"], [1.0, -0.5, 0.0, 2.0],
                                scale=1.0, mark=1)
    assert "<script>" not in out and "</script>" not in out
    assert "&lt;script&gt;" in out and "&amp;amp;" in out and "&quot;x&quot;" in out
    assert 'class="t mark"' in out and out.count('class="t') == 4
    assert "↵</span>\n" in out  # a newline token shows ↵ then breaks the line
    assert f"rgba({','.join(map(str, highlight.POS_RGB))},0.80)" in out  # clipped at full strength
    chips = highlight.chips(["<b>", " the"])
    assert "&lt;b&gt;" in chips and "<b>" not in chips


def test_token_layout_wraps_and_breaks_after_newlines():
    tokens = ["a" * 40] * 5 + ["b\n", "c"]
    lay = charts.token_layout(tokens, line_width=700)
    assert (lay["x1"] <= 700).all()
    assert lay["y0"].nunique() >= 3
    b, c = lay.iloc[5], lay.iloc[6]
    assert c["x0"] == 0 and c["y0"] > b["y0"]
    assert lay.iloc[5]["text"] == "b↵"


def test_token_chart_marks_the_target_and_carries_the_top5():
    data, spec = charts.token_chart(["<s>", "Hi", " there"], [[("x", 0.5)], [("y", 0.25)], [("z", 0.1)]],
                                    [None, 0.3, 0.6], values=[0.0, 2.0, -1.0], target=2)
    assert data["is_target"].tolist() == [False, False, True]
    assert data["strength"].tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert data["polarity"].tolist() == ["positive", "positive", "negative"]
    assert data["next5"].iloc[1] == "'y' 0.25" and data["p"].tolist() == ["–", "0.300", "0.600"]
    params = spec["layer"][0]["params"]
    assert params[0]["name"] == charts.TOKEN_SELECTION and params[0]["select"]["on"] == "click"
    # a valid Vega-Lite spec once the data is attached (Altair validates against the schema)
    alt.LayerChart.from_dict({**spec, "data": {"values": data.to_dict("records")}}, validate=True)


def test_every_chart_builder_gives_a_valid_vega_lite_spec():
    """The pages skip Altair's validation when rendering (charts.unvalidated); it runs here instead."""
    tokens = ["<s>", "Which", " is", "\n", " bigger"]
    heat = ranking.activation_heatmap(_trace(torch.randn(3, 5, 4)), None, threshold=0.5, skip_sink=True)
    rows = pd.DataFrame({"layer": [0, 2], "neuron": [1, 3], "polarity": [1, -1], "token_index": [1, 4],
                         "value": [2.0, -1.5], "activation": [1.0, -1.0], "summary": ["a", None],
                         "token": ["1: 'Which'", "4: ' bigger'"]})
    hist = pd.DataFrame({"value": np.linspace(-1, 1, 50), "group": ["random exemplars"] * 50})
    results = pd.DataFrame({"layer": [0, 8], "neuron": [1, 2], "polarity": [1, -1], "score": [0.3, np.nan],
                            "similarity": [0.7, 0.6], "summary": ["x", "y"], "url": ["neuron?layer=0&neuron=1"] * 2})
    built = [charts.heatmap(heat, tokens, "sum_abs", "Σ", 3), charts.top_bar(rows, 10, "value"),
             charts.activation_histogram(hist, {"1e-5": -0.9, "1 − 1e-5": 0.9}),
             charts.search_scatter(results, 30)]
    for chart in built:
        spec = chart.to_dict(validate=True)
        assert spec["description"] in {"heatmap", "top_bar", "histogram", "browse_chart"}
    fast = charts.unvalidated(charts.top_bar(rows, 10, "value"))
    assert fast.to_dict()["description"] == "top_bar"
