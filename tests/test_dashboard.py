"""The Streamlit dashboard through ``AppTest``: every page, the chat and trace flow, bad input, sessions.

The app runs in-process on the embedded model against the ``embedded_db`` fixture (the real
pipeline on the tiny corpus, layers 0, 8, 15, 22, 29 described). Assertions are on what the
pages render: chat messages, table rows, chart data, metrics, errors and warnings.
Generations are kept to a few greedy tokens so a chat turn costs a couple of seconds.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = ROOT / "dashboard" / "app.py"
TIMEOUT = 300  # seconds per script run: the first one loads the model
QUESTION = "Which is bigger: 9.8 or 9.11?"


# --------------------------------------------------------------------------- helpers
@pytest.fixture()
def env(monkeypatch, embedded_db):
    """The standard configuration: embedded model, the test database."""
    monkeypatch.setenv("MONITOR_MODEL", "embedded")
    monkeypatch.setenv("MONITOR_DB", str(embedded_db))
    monkeypatch.delenv("MONITOR_MAX_MESSAGE_CHARS", raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def db(embedded_db):
    from cache.db import open_database

    with open_database(embedded_db) as handle:
        yield handle


def new_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def ok(at: AppTest) -> AppTest:
    """The run raised nothing (no traceback on screen)."""
    assert not at.exception, [e.value for e in at.exception]
    return at


def start(max_new_tokens: int = 4) -> AppTest:
    at = ok(new_app().run())
    at.slider(key="w_max_new_tokens").set_value(max_new_tokens)
    at.slider(key="w_temperature").set_value(0.0)
    return at


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text)
    return ok(at.run())


# Read-only tables carry no key in the element tree, so they are found by their columns (and order).
TABLES = {
    "top5": ({"next token", "probability"}, 0),
    "quantiles": ({"quantile", "activation"}, 0),
    "neighbours_1": ({"similarity", "summary", "url"}, 0),
    "browse_results": ({"summary", "description", "url"}, 0),
    "meta_table": ({"", "value"}, 0),
    "corpus_sources": ({"name", "n_sequences"}, 0),
    "row_counts": ({"table", "rows"}, 0),
}


def table(at: AppTest, key: str = "neuron_table") -> pd.DataFrame:
    """The dataframe drawn with ``key`` (interactive tables) or known by its columns (:data:`TABLES`)."""
    found = [d.value for d in at.dataframe if d.key == key]
    if not found and key in TABLES:
        columns, index = TABLES[key]
        found = [v for v in (d.value for d in at.dataframe) if columns <= set(v.columns)][index:]
    assert found, f"no table {key!r}; have {[list(d.value.columns) for d in at.dataframe]}"
    return found[0]


def chart(at: AppTest, key: str) -> tuple[dict, list[pd.DataFrame]]:
    """(Vega-Lite spec, its datasets) of the chart whose description is ``key`` (dashboard.charts names them)."""
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        if spec.get("description") == key:
            data = [convert_arrow_bytes_to_pandas_df(d.data.data) for d in el.proto.datasets]
            if el.proto.HasField("data") and el.proto.data.data:  # st.vega_lite_chart(data, spec)
                data.insert(0, convert_arrow_bytes_to_pandas_df(el.proto.data.data))
            return spec, data
    raise AssertionError(f"no chart {key!r}")


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [h.value for h in at.header]
    parts += [h.value for h in at.subheader] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def chat_texts(at: AppTest) -> list[str]:
    return [m.value for msg in at.chat_message for m in msg.markdown]


def messages_shown(at: AppTest) -> list[tuple[str, str]]:
    return [(msg.name, "\n".join(m.value for m in msg.markdown)) for msg in at.chat_message]


def to_neuron_page(at: AppTest, layer, neuron) -> AppTest:
    at.switch_page("pages/neuron.py")
    at.query_params = {"layer": str(layer), "neuron": str(neuron)}
    return ok(at.run())


# --------------------------------------------------------------------------- chat and trace
def test_chat_turn_streams_reply_and_fills_the_activation_table(env, db):
    at = start()
    assert not at.error
    assert at.chat_input[0].disabled is False
    send(at, QUESTION)
    shown = messages_shown(at)
    assert [r for r, _ in shown] == ["user", "assistant"]
    assert shown[0][1] == QUESTION and shown[1][1].strip()

    rows = table(at)
    assert len(rows) > 0
    assert {"layer", "neuron", "polarity", "token", "description", "score", "url"} <= set(rows.columns)
    value = rows["value"]  # activation ÷ extreme quantile
    assert (value.abs() >= 1.0 - 1e-9).all(), "default filter is |value ÷ extreme quantile| >= 1"
    assert list(value.abs()) == sorted(value.abs(), reverse=True)
    assert not rows["token"].str.startswith("0:").any(), "token 0 (the sink) is excluded by default"
    assert rows.duplicated(["layer", "neuron"]).sum() == 0, "one row per neuron"
    for r in rows.head(20).itertuples():
        assert r.url == f"neuron?layer={r.layer}&neuron={r.neuron}"
    # descriptions joined from the database: described layers have text, the others say so
    described = rows[rows["layer"].isin([0, 8, 15, 22, 29])]
    undescribed = rows[~rows["layer"].isin([0, 8, 15, 22, 29])]
    assert (undescribed["description"] == "not described").all()
    if len(described):
        r = described.iloc[0]
        expected = db.neuron(int(r.layer), int(r.neuron))["descriptions"][1 if r.polarity == "positive" else -1]
        assert r.description == expected["text"]
        if expected["score"] is None:  # no prediction is stored as NULL and shown as a blank score
            assert pd.isna(r.score)
        else:
            assert r.score == pytest.approx(expected["score"])

    # the three charts and the tokens
    spec, data = chart(at, "heatmap")
    assert data and {"layer", "token_index"} <= set(data[0].columns)
    spec, data = chart(at, "top_bar")
    assert set(data[0]["polarity_name"]) <= {"positive", "negative"}
    spec, data = chart(at, "token_chart")
    tokens = data[0]
    assert len(tokens) > 20 and "next5" in tokens and tokens["pos"].tolist() == list(range(len(tokens)))
    assert any("bigger" in t for t in tokens["text"])
    # top-5 next tokens of the selected token
    assert "Top-5 next tokens after token" in texts(at)
    picker = at.selectbox(key="w_target")
    assert len(picker.options) == len(tokens)


def test_trace_is_computed_once_per_conversation_and_target(env, monkeypatch):
    import engine.trace

    calls = []
    real = engine.trace.run_trace

    def counting(*args, **kwargs):
        calls.append(kwargs.get("target_index"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.trace, "run_trace", counting)
    at = start()
    send(at, "Name a fruit.")
    assert calls == [None]
    # display-only widgets: no new trace
    at.slider(key="w_threshold").set_value(2.0).run()
    at.toggle(key="w_skip_sink").set_value(False).run()
    at.radio(key="w_heat_metric").set_value("count over threshold").run()
    at.text_input(key="w_table_filter").set_value("fruit").run()
    ok(at)
    assert calls == [None]
    # attribution: one more trace for the target; the objective is a display change
    at.segmented_control(key="w_mode").set_value("Attribution").run()
    ok(at)
    assert len(calls) == 2 and calls[1] is not None
    at.radio(key="w_objective").set_value("prob").run()
    at.segmented_control(key="w_mode").set_value("Activation").run()
    at.segmented_control(key="w_mode").set_value("Attribution").run()
    ok(at)
    assert len(calls) == 2
    # the neuron page reuses the conversation's trace too
    to_neuron_page(at, 8, 5)
    assert len(calls) == 2


def test_threshold_and_sink_toggle(env):
    at = start()
    send(at, QUESTION)
    default = table(at)
    at.slider(key="w_threshold").set_value(2.0).run()
    strict = table(ok(at))
    assert len(strict) < len(default)
    assert (strict["value"].abs() >= 2.0 - 1e-9).all()
    at.slider(key="w_threshold").set_value(1.0)
    at.toggle(key="w_skip_sink").set_value(False).run()
    with_sink = table(ok(at))
    # the attention sink dominates once it is included: its values are far beyond any corpus quantile
    assert with_sink.iloc[0]["token"].startswith("0:")
    assert abs(with_sink.iloc[0]["value"]) > abs(default.iloc[0]["value"])


def test_attribution_mode_target_and_objective(env):
    at = start()
    send(at, QUESTION)
    at.segmented_control(key="w_mode").set_value("Attribution").run()
    ok(at)
    # default target: the first token of the reply
    picker = at.selectbox(key="w_target")
    target = picker.value
    assert "Target token **" in texts(at)
    rows = table(at)
    assert 0 < len(rows) <= 1000
    assert list(rows["value"].abs()) == sorted(rows["value"].abs(), reverse=True)
    # pick another target with the token picker
    new_target = target - 3
    picker.set_value(new_target).run()
    ok(at)
    note = [m.value for m in at.markdown if m.value.startswith("Target token **")][0]
    assert note.startswith(f"Target token **{new_target}**")
    p = float(re.search(r"p = ([0-9.]+)", note).group(1))
    logprob_rows = table(at)
    assert "Top-5 next tokens after token " + str(new_target) in texts(at)
    top5 = table(at, "top5")
    assert len(top5) == 5 and list(top5["probability"]) == sorted(top5["probability"], reverse=True)
    # token 0 cannot be a target: the page says so and keeps the picker to choose another
    at.selectbox(key="w_target").set_value(0).run()
    assert any("Token 0 has nothing before it" in i.value for i in ok(at).info)
    assert len(table(at)) == 0 and at.selectbox(key="w_target").value == 0
    at.selectbox(key="w_target").set_value(new_target).run()
    assert table(ok(at))[["layer", "neuron", "token"]].equals(logprob_rows[["layer", "neuron", "token"]])
    # prob objective = logprob attribution × p(target): same cells, same order, values scaled by p
    at.radio(key="w_objective").set_value("prob").run()
    prob_rows = table(ok(at))
    assert prob_rows[["layer", "neuron", "token"]].equals(logprob_rows[["layer", "neuron", "token"]])
    ratio = (prob_rows["value"] / logprob_rows["value"]).to_numpy()
    assert np.allclose(ratio, ratio[0], rtol=1e-4) and ratio[0] == pytest.approx(p, abs=2e-3)


def test_contrastive_and_answer_level_objectives(env):
    """Distractor picker (default: the runner-up next token), typed distractors, answer pairs, bad input."""
    from engine.loader import load_model
    from engine.trace import run_trace

    at = start()
    send(at, QUESTION)
    at.segmented_control(key="w_mode").set_value("Attribution").run()
    target = at.selectbox(key="w_target").value
    at.radio(key="w_objective").set_value("contrast").run()
    ok(at)
    picker = at.selectbox(key=f"w_distractor_{target}")
    top5 = table(at, "top5")
    note = [m.value for m in at.markdown if m.value.startswith("Target token **")][0]
    assert " vs distractor " in note and "− log p(" in note
    # the table equals the engine's contrastive attribution to the same distractor
    lm = load_model("embedded")
    chat = [dict(m) for m in at.session_state["messages"]]
    fwd = run_trace(lm, chat, add_generation_prompt=False)
    assert picker.value == next(t for t, _ in fwd.top_next[target - 1] if t != fwd.tokens[target])  # the runner-up
    want = run_trace(lm, chat, target_index=target, distractor=picker.value, add_generation_prompt=False)
    rows = table(at)
    first = rows.iloc[0]
    tok = int(str(first["token"]).split(":")[0])
    assert first["value"] == pytest.approx(float(want.attributions[first["layer"], tok, first["neuron"]]), rel=1e-4)
    assert len(top5) == 5
    # a bad typed distractor: one clear line in st.error, no traceback
    at.text_input(key="w_distractor_text").set_value("id:999999999").run()
    assert any("Unknown distractor token id" in e.value for e in ok(at).error)
    at.text_input(key="w_distractor_text").set_value("").run()
    # answer level: two answers and a stem
    at.radio(key="w_objective").set_value("answer").run()
    assert any("Type an answer" in i.value for i in ok(at).info)
    at.text_input(key="w_answer").set_value("9.8")
    at.text_input(key="w_versus").set_value("9.11")
    at.text_input(key="w_stem").set_value("The bigger number is ").run()
    note = [m.value for m in ok(at).markdown if m.value.startswith("Answer level:")][0]
    assert "L('9.8') − L('9.11')" in note
    assert len(table(at)) > 0
    at.text_input(key="w_versus").set_value("9.8").run()
    assert any("the same" in e.value for e in ok(at).error)


def test_inspect_neuron_colours_tokens_and_keyword_filter(env):
    at = start()
    send(at, "Quote a Bible verse about peace.")
    rows = table(at)
    second = f"{rows.iloc[1]['layer']}/{rows.iloc[1]['neuron']}"
    at.selectbox(key="w_inspect").set_value(second).run()
    ok(at)
    spec, data = chart(at, "token_chart")
    assert f"L{second.replace('/', '/N')}" in texts(at)
    assert data[0]["strength"].max() == pytest.approx(1.0)
    link = [p for p in at.page_link if p.value.startswith("Open neuron")][0]
    assert link.value == f"Open neuron L{second.replace('/', '/N')}"
    # keyword filter: every row mentions the keyword
    at.text_input(key="w_table_filter").set_value("Bible").run()
    filtered = table(ok(at))
    text = (filtered["description"].fillna("") + " " + filtered["token"]).str.lower()
    assert len(filtered) and text.str.contains("bible").all()
    at.text_input(key="w_table_filter").set_value("zzqx-nothing-matches").run()
    assert any("No row matches" in w.value for w in ok(at).warning)
    # only described neurons
    at.text_input(key="w_table_filter").set_value("")
    at.toggle(key="w_only_described").set_value(True).run()
    only = table(ok(at))
    assert len(only) > 0 and set(only["layer"]) <= {0, 8, 15, 22, 29}
    assert not (only["description"] == "not described").any()


def test_system_prompt_regenerate_and_clear(env):
    at = start()
    at.text_area(key="w_system_prompt").set_value("You are a pirate who loves parrots.")
    send(at, "Hello!")
    labels = at.selectbox(key="w_target").options
    assert any("pirate" in label for label in labels), "the system prompt is part of the traced conversation"
    first = messages_shown(at)
    assert [r for r, _ in first] == ["user", "assistant"]
    at.slider(key="w_temperature").set_value(1.2)
    at.button(key="regenerate").click().run()
    again = messages_shown(ok(at))
    assert [r for r, _ in again] == ["user", "assistant"] and again[0] == first[0]
    # a second turn keeps the history
    send(at, "And then?")
    assert [r for r, _ in messages_shown(at)] == ["user", "assistant", "user", "assistant"]
    at.button(key="clear").click().run()
    ok(at)
    assert messages_shown(at) == []
    assert not [d for d in at.dataframe if d.key == "neuron_table"]
    assert "No messages yet" in texts(at)


def test_bad_messages_warn_and_the_app_keeps_working(env):
    env.setenv("MONITOR_MAX_MESSAGE_CHARS", "40")
    at = start()
    send(at, "   ")
    assert any("empty" in w.value for w in at.warning)
    assert messages_shown(at) == []
    send(at, "x" * 41)
    assert any("41 characters" in w.value and "limit is 40" in w.value for w in at.warning)
    assert messages_shown(at) == []
    send(at, "Hi there")
    assert [r for r, _ in messages_shown(at)] == ["user", "assistant"]
    assert len(table(at)) > 0


def test_root_url_with_neuron_ids_opens_the_neuron_page(env):
    at = new_app()
    at.query_params = {"layer": "8", "neuron": "5"}
    ok(at.run())
    assert [h.value for h in at.header] == ["Layer 8 · neuron 5"]


# --------------------------------------------------------------------------- neuron page
def test_neuron_page_described_layer(env, db):
    at = start()
    send(at, "<script>alert('hi')</script> & 9.8 < 9.11?")
    to_neuron_page(at, 8, 5)
    info = db.neuron(8, 5)
    assert [h.value for h in at.header] == ["Layer 8 · neuron 5"]
    body = texts(at)
    for pol in (1, -1):
        d = info["descriptions"][pol]
        assert d["text"] in body and d["summary"] in body
    metrics = {(m.label, m.value) for m in at.metric}
    assert ("explainer", info["descriptions"][1]["explainer"]) in metrics
    main = info["descriptions"][1]["score"]  # NULL when the simulator made no prediction
    assert ("score", "unscored" if main is None else f"{main:.2f}") in metrics
    # every score of both polarities, with its plain-language badge
    from dashboard.score_badges import badge_markdown

    scores = db.scores_for(8, 5)
    assert len(scores) == 6 and set(scores.scorer) == {"offline-token-match-v2", "embedding-auc-v1", "embedding-span-auc-v1"}
    for r in scores.itertuples():
        value = None if r.value != r.value else float(r.value)
        assert badge_markdown(r.scorer, value) in body
    # live activation on this session's conversation, HTML-escaped
    assert "On the current conversation" in body
    live = at.html[0].value
    assert "&lt;" in live and "<script" not in live and ">alert<" in live
    labels = {m.label for m in at.metric}
    assert "most extreme token (token 0 excluded)" in labels
    # exemplars: one HTML block per exemplar, escaped, coloured
    html = [h.value for h in at.html]
    n_ex = len(info["exemplars"])
    assert len(html) >= 1 + n_ex
    assert all("<script" not in h for h in html)
    assert "background:rgba(" in "".join(html)
    top = info["exemplars"][0]
    assert f"max {top['max_act']:+.3g}" in "".join(html)
    # quantiles, histogram, output tokens, neighbours
    q = table(at, "quantiles")
    assert len(q) == len(info["quantiles"])
    spec, data = chart(at, "histogram")
    assert set(data[0]["group"]) >= {"random exemplars", "top exemplars"}
    chips = "".join(html)
    for tok in info["promotes"][:3]:
        assert tok.strip() == "" or tok.strip().replace("&", "&amp;").replace("<", "&lt;") in chips
    near = table(at, "neighbours_1")
    expected = db.nearest_neurons(8, 5, 1, k=8)
    assert near["layer"].tolist() == expected["layer"].tolist()
    assert near["neuron"].tolist() == expected["neuron"].tolist()
    assert near["url"].str.fullmatch(r"neuron\?layer=\d+&neuron=\d+").all()


def test_neuron_page_undescribed_layer_still_shows_data(env, db):
    at = to_neuron_page(new_app(), 3, 7)
    assert any("Layer 3 is not described" in i.value for i in at.info)
    assert "not described" in texts(at)
    info = db.neuron(3, 7)
    assert len(info["exemplars"]) > 0
    assert len([h for h in at.html if "mon-toks" in h.value]) >= len(info["exemplars"])
    assert len(table(at, "quantiles")) == len(info["quantiles"])
    chart(at, "histogram")
    assert "No conversation in this session" in texts(at)


@pytest.mark.parametrize("layer, neuron, message", [
    ("99", "5", "Layer 99 is out of range"),
    ("8", "100000", "Neuron 100000 is out of range"),
    ("-1", "3", "Layer -1 is out of range"),
    ("abc", "3", "`layer=abc` in the address is not a whole number"),
    ("8", "1; DROP TABLE neurons", "is not a whole number"),
])
def test_neuron_page_bad_ids(env, layer, neuron, message):
    at = to_neuron_page(new_app(), layer, neuron)
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert not at.header  # nothing half-drawn


# --------------------------------------------------------------------------- database browser
def test_browse_semantic_search_writes_the_url(env, db):
    at = new_app()
    at.switch_page("pages/browse.py")
    ok(at.run())
    assert any("Type a concept" in i.value for i in at.info)
    at.text_input(key="w_browse_q").set_value("Bible verses").run()
    rows = table(ok(at), "browse_results")
    assert len(rows) == 50
    # by default ranked by behaviour: b · (1 + boost · max(s, 0)) of the parts' cosines shown in "why"
    assert list(rows["behaviour_rank"]) == sorted(rows["behaviour_rank"], reverse=True)
    from cache.search_explain import SOURCE_BOOST

    parts = rows["why"].str.extract(r"behaviour .*? \((-?\d\.\d\d)\)(?:; source .*? \((-?\d\.\d\d)\))?(?:;|$)").astype(float)
    b, src = parts[0].to_numpy(), parts[1].fillna(0).clip(lower=0).to_numpy()
    assert np.allclose(rows["behaviour_rank"], b * (1 + SOURCE_BOOST * src), atol=0.01)  # the "why" shows 2 decimals
    assert rows["url"].str.fullmatch(r"neuron\?layer=\d+&neuron=\d+").all()
    assert at.query_params.get("q") in ("Bible verses", ["Bible verses"])
    spec, data = chart(at, "browse_chart")
    assert len(data[0]) == 50 and set(data[0]["polarity_name"]) <= {"positive", "negative"}
    # filters narrow the results and go to the URL
    at.slider(key="w_browse_layers").set_value((8, 15))
    at.selectbox(key="w_browse_pol").set_value("negative")
    at.slider(key="w_browse_min_score").set_value(0.1).run()
    rows = table(ok(at), "browse_results")
    assert rows["layer"].between(8, 15).all() and (rows["polarity"] == "negative").all()
    assert (rows["score"] >= 0.1).all()
    qp = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert qp == {"q": "Bible verses", "layers": "8-15", "pol": "negative", "min_score": "0.1"}
    # every scorer is a column with its badge, and each hit says why it matched
    assert {"offline-token-match-v2", "embedding-auc-v1", "why"} <= set(rows.columns)
    assert rows["why"].str.startswith("matched mostly on its ").all()
    # the minimum applies to the chosen scorer, and the table sorts by any scorer
    at.selectbox(key="w_browse_scorer").set_value("embedding-auc-v1")
    at.slider(key="w_browse_min_score").set_value(0.6).run()
    at.selectbox(key="w_browse_sort").set_value("embedding-auc-v1").run()
    rows = table(ok(at), "browse_results")
    auc = rows["embedding-auc-v1"]
    assert len(rows) and (auc >= 0.6).all() and list(auc) == sorted(auc, reverse=True)
    qp = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert qp["scorer"] == "embedding-auc-v1" and qp["sort"] == "embedding-auc-v1" and qp["min_score"] == "0.6"
    at.selectbox(key="w_browse_sort").set_value("similarity").run()  # the whole summary's cosine
    sims = table(ok(at), "browse_results")["similarity"]
    assert len(sims) and list(sims) == sorted(sims, reverse=True)


def test_browse_link_reproduces_the_view(env, db):
    at = new_app()
    at.switch_page("pages/browse.py")
    at.query_params = {"q": "verses", "mode": "keyword", "layers": "0-8", "pol": "positive", "k": "20"}
    ok(at.run())
    assert at.text_input(key="w_browse_q").value == "verses"
    assert at.radio(key="w_browse_mode").value == "keyword"
    assert at.slider(key="w_browse_layers").value == (0, 8)
    rows = table(at, "browse_results")
    expected = db.keyword_search("verses", k=20, layer_range=(0, 8), polarity=1)
    assert rows["layer"].tolist() == expected["layer"].tolist()
    assert rows["neuron"].tolist() == expected["neuron"].tolist()
    assert (rows["description"].str.lower().str.contains("verses") | rows["summary"].str.lower().str.contains("verses")).all()


def test_browse_bad_url_values_warn(env):
    at = new_app()
    at.switch_page("pages/browse.py")
    at.query_params = {"q": "dates", "layers": "20-3", "min_score": "lots", "k": "0", "pol": "sideways"}
    ok(at.run())
    warnings = " ".join(w.value for w in at.warning)
    for part in ("layers='20-3'", "min_score='lots'", "k='0'", "pol='sideways'"):
        assert part in warnings
    assert len(table(at, "browse_results")) == 50  # the defaults for the ignored values


@pytest.mark.parametrize("query", ["'; DROP TABLE descriptions; --", "100%", "_", "\\", "\" OR 1=1 --"])
def test_browse_sql_metacharacters_are_literal(env, db, query):
    at = new_app()
    at.switch_page("pages/browse.py")
    at.query_params = {"q": query, "mode": "keyword"}
    ok(at.run())
    assert not at.error
    literal = db.keyword_search(query, k=50)
    if len(literal):
        assert len(table(at, "browse_results")) == len(literal)
    else:
        assert any("No description matches" in w.value for w in at.warning)
    # semantic search on the same text works too, and the database is intact afterwards
    at.radio(key="w_browse_mode").set_value("semantic").run()
    assert len(table(ok(at), "browse_results")) == 50
    assert db.counts()["descriptions"] > 0


@pytest.fixture()
def downloads(monkeypatch):
    """file name → bytes of every st.download_button drawn (AppTest does not expose them)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    captured: dict[str, bytes] = {}
    real_add = MediaFileManager.add

    def recording_add(self, path_or_data, mimetype, coordinates, file_name=None, is_for_static_download=False):
        if file_name:
            captured[file_name] = path_or_data if isinstance(path_or_data, bytes) else path_or_data.encode()
        return real_add(self, path_or_data, mimetype, coordinates, file_name, is_for_static_download)

    monkeypatch.setattr(MediaFileManager, "add", recording_add)
    return captured


def test_browse_export_csv_and_parquet(env, downloads):
    captured = downloads
    at = new_app()
    at.switch_page("pages/browse.py")
    at.query_params = {"q": "dates", "k": "25"}
    ok(at.run())
    shown = table(at, "browse_results")
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download CSV", "Download Parquet"]
    assert set(captured) == {"neurons-dates.csv", "neurons-dates.parquet"}
    csv = pd.read_csv(io.BytesIO(captured["neurons-dates.csv"]))
    parquet = pd.read_parquet(io.BytesIO(captured["neurons-dates.parquet"]))
    for exported in (csv, parquet):
        assert len(exported) == len(shown) == 25
        assert exported["layer"].tolist() == shown["layer"].tolist()
        assert exported["neuron"].tolist() == shown["neuron"].tolist()
        assert set(exported["polarity"]) <= {1, -1}
        assert {"description", "summary", "score", "similarity"} <= set(exported.columns)
    assert parquet["description"].tolist() == csv["description"].tolist()


# --------------------------------------------------------------------------- about / status
def test_about_page(env, db):
    at = new_app()
    at.switch_page("pages/about.py")
    ok(at.run())
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["model"] == "embedded"
    assert metrics["layers × neurons"] == "30 × 1,536"
    assert metrics["described layers"] == "5 of 30"
    meta = table(at, "meta_table")
    values = dict(zip(meta.iloc[:, 0], meta["value"]))
    assert values["explainer"] == db.meta["explainer"] and values["scorer"] == db.meta["scorer"]
    assert values["described layers"] == "0, 8, 15, 22, 29"
    counts = table(at, "row_counts")
    assert dict(zip(counts["table"], counts["rows"])) == db.counts()
    sources = table(at, "corpus_sources")
    assert set(sources["name"]) == {s["name"] for s in json.loads(db.meta["corpus_sources"])}


# --------------------------------------------------------------------------- missing or broken pieces
def test_missing_database(env, tmp_path):
    env.setenv("MONITOR_DB", str(tmp_path / "nowhere.duckdb"))
    at = new_app()
    at.switch_page("pages/about.py")
    ok(at.run())
    assert any("No neuron database" in e.value for e in at.error)
    assert [c.value for c in at.code] == ["python -m precompute build --model embedded"]
    # the browser says so too
    at.switch_page("pages/browse.py")
    ok(at.run())
    assert at.error and [c.value for c in at.code] == ["python -m precompute build --model embedded"]
    # chat and trace still work: raw activations, no descriptions
    at.switch_page("pages/chat.py")
    ok(at.run())
    at.slider(key="w_max_new_tokens").set_value(3)
    send(at, "Hello")
    assert any("No neuron database" in w.value for w in at.warning)
    rows = table(at)
    assert len(rows) > 0 and (rows["description"] == "no database loaded").all()
    assert (rows["value"] == rows["activation"]).all(), "without quantiles the value is the raw activation"
    # and the neuron page shows the live activation without database data
    to_neuron_page(at, 2, 3)
    assert "On the current conversation" in texts(at) and at.html


def test_corrupt_database(env, tmp_path):
    bad = tmp_path / "corrupt.duckdb"
    bad.write_bytes(b"this is not a duckdb file" * 100)
    env.setenv("MONITOR_DB", str(bad))
    at = new_app()
    at.switch_page("pages/about.py")
    ok(at.run())
    assert any("not a readable DuckDB file" in e.value and "python -m precompute build" in e.value for e in at.error)
    at.switch_page("pages/neuron.py")
    at.query_params = {"layer": "1", "neuron": "2"}
    ok(at.run())
    assert any("not a readable DuckDB file" in w.value for w in at.warning)


def test_model_that_fails_to_load(env, tmp_path):
    (tmp_path / "broken-model").mkdir()
    env.setenv("MONITOR_MODEL", str(tmp_path / "broken-model"))
    at = ok(new_app().run())
    assert any("could not be loaded" in e.value and "config.json" in e.value for e in at.error)
    assert at.chat_input[0].disabled
    # the database pages keep working
    at.switch_page("pages/browse.py")
    at.query_params = {"q": "dates"}
    ok(at.run())
    assert len(table(at, "browse_results")) == 50
    at.switch_page("pages/about.py")
    ok(at.run())
    assert any("config.json" in e.value for e in at.error)


# --------------------------------------------------------------------------- sessions
def test_sessions_do_not_share_conversations(env):
    a, b = start(), start()
    send(a, "Tell me about apples.")
    ok(b.run())
    assert messages_shown(b) == []
    send(b, "Tell me about bananas.")
    ok(a.run())
    assert [t for r, t in messages_shown(a) if r == "user"] == ["Tell me about apples."]
    assert [t for r, t in messages_shown(b) if r == "user"] == ["Tell me about bananas."]
    tokens_a = " ".join(chart(a, "token_chart")[1][0]["text"])
    tokens_b = " ".join(chart(b, "token_chart")[1][0]["text"])
    assert "apples" in tokens_a and "bananas" not in tokens_a
    assert "bananas" in tokens_b and "apples" not in tokens_b


def test_two_sessions_at_once_share_one_model(env):
    """Two sessions run chat turns in parallel threads against the one cached model and database."""
    sessions = {"apples": start(), "bananas": start()}
    results: dict[str, object] = {}

    def turn(word: str) -> None:
        try:
            at = sessions[word]
            send(at, f"Tell me about {word}.")
            results[word] = (messages_shown(at), len(table(at)), " ".join(chart(at, "token_chart")[1][0]["text"]))
        except BaseException as err:  # reported below, on the main thread
            results[word] = err

    threads = [threading.Thread(target=turn, args=(w,)) for w in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    for word, other in (("apples", "bananas"), ("bananas", "apples")):
        res = results[word]
        assert not isinstance(res, BaseException), res
        shown, n_rows, tokens = res
        assert [t for r, t in shown if r == "user"] == [f"Tell me about {word}."]
        assert n_rows > 0 and word in tokens and other not in tokens


# --------------------------------------------------------------------------- extension panels
def test_chat_panels_eager_and_lazy(env):
    from dashboard import panels

    calls = {"eager": 0, "lazy": 0}

    def eager(ctx):
        calls["eager"] += 1
        import streamlit as st

        st.markdown(f"eager panel: {len(ctx.rows)} rows, mode {ctx.mode}")

    def lazy(ctx):
        calls["lazy"] += 1
        import streamlit as st

        st.markdown("lazy panel drawn")

    saved = list(panels.CHAT_PANELS)
    try:
        panels.register_panel("Test eager", eager)
        panels.register_panel("Test lazy", lazy, lazy=True)
        at = start()
        send(at, "Hi")
        labels = [e.label for e in at.expander]
        assert "Test eager" in labels and "Test lazy" in labels
        assert calls == {"eager": 1, "lazy": 0}
        assert any(m.value.startswith("eager panel: ") and "mode Activation" in m.value for m in at.markdown)
        at.session_state[panels.panel_key(panels.Panel("Test lazy", lazy))] = True  # the user opens it
        ok(at.run())
        assert calls == {"eager": 2, "lazy": 1}
        assert any(m.value == "lazy panel drawn" for m in at.markdown)
    finally:
        panels.CHAT_PANELS[:] = saved
