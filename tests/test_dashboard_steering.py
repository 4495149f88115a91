"""The steering side of the dashboard through ``AppTest``: semantic steering, the concept linter, the experiments page.

Same setup as ``tests/test_dashboard.py`` (whose fixtures and helpers are reused): the app
runs in-process on the embedded model against the ``embedded_db`` fixture. Assertions are on
what the pages render: spec lists, neuron tables, charts' data, errors, the ``?steer=`` address
and downloaded files. Generations are kept to a few greedy tokens and experiments to a
handful of prompts, so the module runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine.prompt_sets import Item
from engine.specs import ConceptSpec, specs_from_json, specs_from_url, specs_to_url
from tests.fake_openai import chat_completion, send_json, serve
from tests.test_dashboard import QUESTION, chart, db, downloads, env, new_app, ok, send, start  # noqa: F401 (fixtures)


STEERING = "pages/steering.py"
EXPERIMENTS = "pages/experiments.py"


# --------------------------------------------------------------------------- helpers
def page(path: str, **query) -> AppTest:
    at = new_app()
    at.switch_page(path)
    if query:
        at.query_params = query
    return ok(at.run())


def errors(at) -> str:
    return "\n".join(e.value for e in at.error)


def frame(at, columns: set) -> pd.DataFrame:
    """The first table drawn with (at least) these columns."""
    for d in at.dataframe:
        if columns <= set(d.value.columns):
            return d.value
    raise AssertionError(f"no table with {columns}; have {[list(d.value.columns) for d in at.dataframe]}")


def spec_lines(at) -> list[str]:
    """The spec list's headings (``**label**``), in order."""
    return [m.value.split("**")[1] for m in at.markdown
            if m.value.startswith("**") and "  \ntokens:" in m.value]


def add_spec(at, concept: str, k: int | None = None, **fields):
    at.text_input(key="sf_concept").set_value(concept)
    at.number_input(key="sf_k").set_value(k)
    for key, value in fields.items():
        at.get_by_key(key).set_value(value)
    at.button(key="steer_add").click()
    return ok(at.run())


@contextlib.contextmanager
def llm_stub():
    """A local OpenAI-compatible /chat/completions endpoint that labels every cluster the same."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            send_json(self, chat_completion(json.dumps({"label": "Stub concept label", "coherence": 4})))

        def log_message(self, *args):
            pass

    with serve(Handler) as url:
        yield url


def url_specs(at) -> list[ConceptSpec]:
    raw = at.query_params.get("steer")
    raw = raw[0] if isinstance(raw, list) else raw
    return specs_from_url(raw)


# --------------------------------------------------------------------------- semantic steering
def test_bad_steering_inputs_are_explained_and_the_app_keeps_working(env):
    at = page(STEERING)
    assert any("No steering specs yet" in i.value for i in at.info)
    # an empty concept
    add_spec(at, "   ")
    assert "The concept is empty" in errors(at)
    # k out of range
    add_spec(at, "dates", 5000)
    assert "k = 5000 is out of range: pick 1 to 1000" in errors(at)
    add_spec(at, "dates", 0)
    assert "k = 0 is out of range" in errors(at)
    # overlapping (and missing, and reversed) token spans
    add_spec(at, "dates", 10, sf_tokens="positions", sf_positions="3-7,5-9")
    assert "overlap" in errors(at) and "3-7" in errors(at)
    add_spec(at, "dates", 10, sf_tokens="positions", sf_positions="")
    assert "Type the token positions" in errors(at)
    add_spec(at, "dates", 10, sf_tokens="positions", sf_positions="9-3")
    assert "reversed" in errors(at)
    # filters that leave nothing
    add_spec(at, "dates", 10, sf_tokens="last_user", sf_keyword="zzzqqqxxy")
    assert "No neuron descriptions match 'dates'" in errors(at)
    # malformed JSON, a spec with a bad field, a damaged link, all pasted
    for text, message in (("[{\"concept\": \"dates\",", "not valid JSON"),
                          ('[{"concept": "dates", "k": 2000}]', "k = 2000 is out of range"),
                          ('[{"concept": "dates", "colour": "red"}]', "Unknown steering-spec field(s) colour"),
                          ("c1.!!!not-base64", "damaged or truncated"),
                          ("https://x/steering?other=1&steer=", "no steer=")):
        at.text_area(key="steer_paste").set_value(text)
        at.button(key="steer_load_replace").click()
        ok(at.run())
        assert message in errors(at), (text, errors(at))
    assert spec_lines(at) == [] and "steer" not in at.query_params
    # and a good spec still goes in
    add_spec(at, "dates", 10, sf_keyword="")
    assert not at.error
    assert spec_lines(at) == ["dates (suppress 10)"]


def test_a_spec_lists_its_neurons_exports_them_and_goes_into_the_url(env, db, downloads):
    at = page(STEERING)
    add_spec(at, "Bible verses", 100)
    assert any("Added Bible verses (suppress 100): 100 neurons selected" in s.value for s in at.success)
    assert spec_lines(at) == ["Bible verses (suppress 100)"]
    rows = frame(at, {"rank", "similarity", "description", "url"})
    assert len(rows) == 100
    assert list(rows["similarity"]) == sorted(rows["similarity"], reverse=True)
    assert set(rows["polarity"]) <= {"positive", "negative"} and rows["description"].notna().all()
    # the same neurons as the database's own semantic search for the concept
    from cache.embedder import embed

    hits = db.semantic_search(embed(["Bible verses"])[0], k=100)
    assert list(zip(rows["layer"], rows["neuron"])) == list(zip(hits["layer"], hits["neuron"]))
    assert rows["similarity"].to_numpy() == pytest.approx(hits["similarity"].to_numpy(), abs=1e-5)
    # CSV export of exactly that table, and the specs as JSON
    csv = pd.read_csv(io.BytesIO(downloads["steer-bible-verses.csv"]))
    assert list(zip(csv["layer"], csv["neuron"], csv["polarity"])) == list(zip(rows["layer"], rows["neuron"], rows["polarity"]))
    assert np.allclose(csv["similarity"], rows["similarity"]) and csv["description"].tolist() == rows["description"].tolist()
    assert [s.label for s in specs_from_json(downloads["steering-specs.json"].decode())] == ["Bible verses (suppress 100)"]
    # the address reproduces it
    assert url_specs(at) == [ConceptSpec("Bible verses", k=100)]
    assert any(c.value.startswith("?steer=c1.") for c in at.code)
    # a specs JSON file replaces them
    upload = json.dumps([{"concept": "dates", "k": 30}, {"concept": "phone versions", "mode": "strengthen"}])
    at.file_uploader(key="steer_upload").set_value(("mine.json", upload.encode(), "application/json")).run()
    assert spec_lines(ok(at)) == ["dates (suppress 30)", "phone versions (strengthen 50 ×0.75)"]
    assert url_specs(at) == specs_from_json(upload)


def test_specs_combine_and_can_be_disabled_edited_and_deleted(env):
    at = page(STEERING)
    add_spec(at, "Bible verses", 200)
    add_spec(at, "dates", 100, sf_mode="strengthen", sf_strength=1.0, sf_layers=(15, 29),
             sf_tokens="prompt+generated")
    assert spec_lines(at) == ["Bible verses (suppress 200)", "dates (strengthen 100 ×1)"]
    union = [m.value for m in at.markdown if m.value.startswith("**Union:**")][0]
    assert "by 2 enabled specs" in union
    overlap = frame(at, {"spec A", "spec B", "shared", "jaccard"})
    assert len(overlap) == 1 and 0 <= overlap["jaccard"].iloc[0] <= 1
    # the neuron list shows the spec added last: the strengthened one, in layers 15-29
    rows = frame(at, {"rank", "similarity", "description"})
    assert len(rows) == 100 and rows["layer"].between(15, 29).all()
    # disable one: the union shrinks to the other, the link keeps it (disabled)
    first, second = [t.key for t in at.toggle if t.key.startswith("steer_on_")]
    at.toggle(key=second).set_value(False).run()
    union = [m.value for m in ok(at).markdown if m.value.startswith("**Union:**")][0]
    assert "by 1 enabled spec " in union
    assert [s.enabled for s in url_specs(at)] == [True, False]
    # edit the first: the form is filled with it, saving replaces it in place
    at.button(key=f"steer_edit_{first.split('_')[-1]}").click().run()
    assert at.text_input(key="sf_concept").value == "Bible verses" and at.number_input(key="sf_k").value == 200
    assert any(m.value.startswith("**Edit:**") for m in at.markdown)
    at.number_input(key="sf_k").set_value(50)
    at.button(key="steer_save").click().run()
    assert spec_lines(ok(at)) == ["Bible verses (suppress 50)", "dates (strengthen 100 ×1)"]
    assert any(m.value == "**Add a concept**" for m in at.markdown) and at.text_input(key="sf_concept").value == ""
    # delete both
    at.button(key=f"steer_del_{first.split('_')[-1]}").click().run()
    assert spec_lines(ok(at)) == ["dates (strengthen 100 ×1)"]
    at.button(key=f"steer_del_{second.split('_')[-1]}").click().run()
    assert spec_lines(ok(at)) == [] and "steer" not in at.query_params


def test_a_steer_link_restores_the_specs_and_a_bad_one_says_why(env):
    specs = [ConceptSpec("Bible verses", k=100),
             ConceptSpec("dates", mode="strengthen", k=20, strength=0.5, tokens="prompt+generated", enabled=False)]
    at = page(STEERING, steer=specs_to_url(specs))
    assert not at.error
    assert spec_lines(at) == ["Bible verses (suppress 100)", "dates (strengthen 20 ×0.5)"]
    assert [t.value for t in at.toggle if t.key.startswith("steer_on_")] == [True, False]
    assert url_specs(at) == specs
    # opening the chat page with the link restores them too (before any conversation)
    chat_at = ok(new_app())
    chat_at.query_params = {"steer": specs_to_url(specs)}
    ok(chat_at.run())
    assert [e.spec for e in chat_at.session_state["steer_specs"]] == specs
    # damaged and foreign links: an error, nothing restored, the page still works
    for raw, message in (("c1.eNqLrlZKVrJScspMyklVKEstKk4", "damaged or truncated"),
                         ("hello", "should start with 'c1.'"),
                         (specs_to_url([ConceptSpec("x")])[:-6] + "AAAAAA", "damaged or truncated")):
        bad = page(STEERING, steer=raw)
        assert message in errors(bad), errors(bad)
        assert spec_lines(bad) == [] and bad.query_params.get("steer") in (raw, [raw])
        # the first change replaces the bad value
        add_spec(bad, "dates", 10)
        assert not bad.error and url_specs(bad) == [ConceptSpec("dates", k=10)]


def test_effect_shows_both_generations_and_the_answer_probabilities(env):
    at = page(STEERING)
    assert at.button(key="steer_run").disabled  # nothing to steer yet
    add_spec(at, "Bible verses")  # the default: suppress the top 500
    at.number_input(key="w_steer_max_new").set_value(4)
    at.text_input(key="w_steer_cands").set_value(" , ")
    at.button(key="steer_run").click().run()
    assert any("at least one answer candidate" in w.value for w in ok(at).warning)
    at.text_input(key="w_steer_cands").set_value("9.8, 9.11")
    at.button(key="steer_run").click().run()
    ok(at)
    assert not at.error
    spec, (data,) = chart(at, "steer_probs")
    assert sorted(set(data["candidate"])) == ["9.11", "9.8"]
    assert set(data["when"]) == {"before (unsteered)", "after (steered)"}
    assert data["value"].between(0, 1).all() and (data["value"] > 0).all()
    probs = frame(at, {"candidate", "p before", "p after", "Δ log p"})
    assert list(probs["candidate"]) == ["9.8", "9.11"]
    assert np.allclose(np.log(probs["p after"]) - np.log(probs["p before"]), probs["Δ log p"], atol=1e-4)
    assert probs["share before"].sum() == pytest.approx(1.0) and probs["share after"].sum() == pytest.approx(1.0)
    assert (probs["Δ log p"].abs() > 0).any(), "suppressing 500 neurons changes the answer probabilities"
    # the two generations side by side, differing tokens marked
    assert len(at.get("html")) >= 2 and any(m.value == "**Steered**" for m in at.markdown)
    assert any("diverge at generated token" in c.value or "identical" in c.value for c in at.caption)
    # the share view is the same chart with shares summing to 1 per side
    at.radio(key="w_steer_prob_field").set_value("share").run()
    _, (shares,) = chart(ok(at), "steer_probs")
    assert shares.groupby("when")["value"].sum().to_numpy() == pytest.approx([1.0, 1.0])


# --------------------------------------------------------------------------- the chat page: linter → steering
def test_linter_clusters_flag_and_turn_a_cluster_into_a_spec_then_its_effect(env):
    at = start()
    send(at, QUESTION)
    assert [e.label for e in at.expander] == ["Concept linter", "Faithfulness of the attribution", "Semantic steering"]
    # both panels are lazy: nothing is computed until the user opens them
    assert not any("How “likely spurious” is decided" in i.value for i in at.info)
    at.session_state["panel_concept_linter"] = True
    at.session_state["panel_semantic_steering"] = True
    ok(at.run())
    clusters = frame(at, {"rank", "flag", "label", "size", "weight", "why"})
    assert len(clusters) >= 1 and (clusters["size"] >= 3).all()
    assert list(clusters["weight"]) == sorted(clusters["weight"], reverse=True)
    assert set(clusters["flag"]) <= {"⚠ likely spurious", "related"}
    rule = [i.value for i in at.info if "How “likely spurious” is decided" in i.value]
    assert rule and "percentile" in rule[0] and "random" in rule[0]
    assert all(w.startswith(("Likely spurious", "Related")) for w in clusters["why"])
    _, (bars,) = chart(at, "lint_chart")
    assert len(bars) == len(clusters)
    # a looser threshold merges clusters
    at.slider(key="w_lint_threshold").set_value(0.9).run()
    assert len(frame(ok(at), {"rank", "flag", "label"})) <= len(clusters)
    at.slider(key="w_lint_threshold").set_value(0.6).run()
    # select a cluster: its explanation, its tokens highlighted and its neurons listed
    pick = at.selectbox(key="w_lint_pick")
    last = pick.options[-1]
    pick.set_value(len(pick.options) - 1).run()
    ok(at)
    chosen = clusters.iloc[-1]
    assert any(chosen["why"] == el.value for el in list(at.warning) + list(at.success))
    members = frame(at, {"layer", "neuron", "polarity", "weight", "tokens", "summary"})
    assert len(members) == chosen["size"]
    assert any(m.value.startswith(f"**Tokens of cluster #{chosen['rank']}**") for m in at.markdown)
    assert last.startswith(f"#{chosen['rank']} ")
    # one button: a spec that suppresses exactly those neurons
    at.button(key="lint_to_spec").click().run()
    ok(at)
    assert any(f"suppresses the {chosen['size']} neurons" in s.value for s in at.success)
    (spec,) = url_specs(at)
    assert spec.mode == "suppress" and spec.neurons is not None and len(spec.neurons) == chosen["size"]
    assert {(l, n) for l, n, _ in spec.neurons} == set(zip(members["layer"], members["neuron"]))
    assert spec_lines(at) == [spec.label]
    # and the steering panel on the chat page shows its effect on the 9.8 / 9.11 answer
    at.number_input(key="w_steer_max_new").set_value(3)
    at.button(key="steer_run").click().run()
    ok(at)
    assert not at.error
    _, (data,) = chart(at, "steer_probs")
    assert sorted(set(data["candidate"])) == ["9.11", "9.8"] and len(data) == 4
    # attribution mode lints the neurons that push the target token
    at.segmented_control(key="w_mode").set_value("Attribution").run()
    ok(at)
    assert "top attribution cells toward the target token" in "\n".join(c.value for c in at.caption)
    assert not at.error
    shown = [d.value for d in at.dataframe if {"rank", "flag", "label"} <= set(d.value.columns)]
    assert shown or any("No cluster of" in i.value for i in at.info)
    if shown:  # the causal check (on by default with a target) ranks by |measured effect|
        effects = shown[0]["measured effect"].abs()
        assert effects.notna().all() and list(effects) == sorted(effects, reverse=True)
        assert shown[0]["null percentile"].between(0, 100).all()
        assert all("random matched sets" in t for t in shown[0]["what suppressing did"])
    # labels from an LLM when one is configured (a stub OpenAI-compatible endpoint here) ...
    with llm_stub() as base_url:
        env.setenv("MONITOR_LLM_BASE_URL", base_url)
        env.setenv("MONITOR_LLM_MODEL", "stub")
        at.segmented_control(key="w_mode").set_value("Activation").run()
        labelled = frame(ok(at), {"rank", "flag", "label", "label from"})
    assert (labelled["label"] == "Stub concept label").all()
    assert (labelled["label from"] == "LLM (coherence 4/5)").all()
    # ... and a half-configured one is explained, the rest of the page still drawn
    env.delenv("MONITOR_LLM_BASE_URL")
    ok(at.run())
    assert "Set both MONITOR_LLM_BASE_URL and MONITOR_LLM_MODEL" in errors(at)
    assert chart(at, "token_chart")


# --------------------------------------------------------------------------- experiments
def test_experiments_page_runs_a_tiny_experiment(env, downloads):
    at = page(EXPERIMENTS)
    assert any("only the baseline will run" in w.value for w in at.warning)
    at.text_area(key="w_exp_specs").set_value("Bible verses:suppress:50")
    at.text_area(key="w_exp_concept_controls").set_value("decimal numbers:suppress:50")
    at.number_input(key="w_exp_pairs").set_value(2)
    at.number_input(key="w_exp_controls").set_value(3)
    at.run()
    assert "6 conditions × 4 prompts = **24** scorings" in "\n".join(c.value for c in ok(at).caption)
    at.button(key="exp_run").click().run()
    ok(at)
    assert not at.error
    assert at.status and "Done: 24 scorings" in at.status[0].label
    _, datasets = chart(at, "exp_chart")
    bars = next(d for d in datasets if "condition" in d.columns)
    assert list(bars["condition"]) == ["baseline", "Bible verses (suppress 50)",
                                       "decimal numbers (suppress 50) [concept control]"]  # controls: the null chart
    assert ((bars["lo"] <= bars["accuracy"]) & (bars["accuracy"] <= bars["hi"]) & (bars["lo"] < bars["hi"])).all()
    _, null = chart(at, "exp_null_chart")
    ticks = next(d for d in null if "change" in d.columns)
    assert sorted(ticks["what"]) == ["random control"] * 3 + ["the concept"]
    table = frame(at, {"condition", "accuracy", "95% CI low", "McNemar p (pairs)", "percentile among controls"})
    assert len(table) == 6 and set(table["kind"]) == {"baseline", "spec", "concept-control", "control"}
    assert table["accuracy"].isin([0, 0.25, 0.5, 0.75, 1.0, 0.125, 0.375, 0.625, 0.875]).all()
    assert (table["mass ratio"].dropna() > 0).all() and table["mass ratio"].notna().sum() == 3
    verdict = "\n".join(i.value for i in at.info)
    assert "Baseline:" in verdict and "random controls" in verdict and "2 pairs" in verdict
    assert any(m.value.startswith("| condition |") for m in at.markdown)
    summary = json.loads(downloads["experiment.json"])
    assert summary["n"] == 4 and [r["kind"] for r in summary["conditions"]] == \
        ["baseline", "spec", "concept-control", "control", "control", "control"]
    assert downloads["experiment.md"].decode().startswith("| condition |")


def test_experiments_page_bad_inputs(env):
    at = page(EXPERIMENTS)
    at.text_area(key="w_exp_specs").set_value("dates:suppress:0")
    at.run()
    assert "Spec line 1: k = 0 is out of range" in errors(ok(at)) and at.button(key="exp_run").disabled
    at.text_area(key="w_exp_specs").set_value("")
    at.text_input(key="w_exp_template").set_value("Compare {x} and {y}")
    at.run()
    assert "must contain {a} and {b}" in errors(ok(at)) and at.button(key="exp_run").disabled
    at.text_input(key="w_exp_template").set_value("")
    at.selectbox(key="w_exp_set").set_value("shorter")
    at.slider(key="w_exp_xrange").set_value((0, 0)).run()
    assert not ok(at).error  # whole part 0: still pairs
    at.radio(key="w_exp_which").set_value("custom").run()
    assert any("Upload a .jsonl file" in i.value for i in ok(at).info) and at.button(key="exp_run").disabled
    at.text_area(key="w_exp_paste").set_value('{"prompt": "2+2?", "correct": "4", "wrong": "5"}\n{"prompt": oops}')
    at.run()
    assert "the pasted prompts:2 is not valid JSON" in errors(ok(at))
    at.text_area(key="w_exp_paste").set_value('{"prompt": "2+2?", "correct": "4", "wrong": "4"}')
    at.run()
    assert "same correct and wrong answer" in errors(ok(at))
    at.text_area(key="w_exp_paste").set_value('{"prompt": "2+2?", "correct": "4", "wrong": "5"}')
    at.run()
    assert not ok(at).error and not at.button(key="exp_run").disabled
    # an uploaded file wins over the pasted text; its errors name it
    at.file_uploader(key="exp_upload").set_value(("qs.jsonl", b'{"prompt": "2+2?", "correct": "4"}\n', "text/plain"))
    at.run()
    assert "qs.jsonl:1 needs non-empty string fields prompt, correct and wrong" in errors(ok(at))
    assert at.button(key="exp_run").disabled


def test_experiments_page_shows_a_replication_report(env, tmp_path, downloads):
    """A report as `experiment replicate` writes it, read from data/reports/, and a broken upload explained."""
    from engine.experiments import Condition, ExperimentResult, analyze, to_json
    from engine.replication import Suite, concat, suite_verdict
    from engine.scoring import Scores

    items = [Item(f"q{i}", "1.5", "1.25", i // 2) for i in range(8)]
    rng = np.random.default_rng(0)
    conds = [Condition("baseline", "baseline"), Condition("dates (suppress 500)", "spec")] + \
        [Condition(f"control {i + 1} of dates (suppress 500)", "control", of="dates (suppress 500)") for i in range(4)]

    def sc():
        c = rng.normal(size=(8, 2))
        return Scores(c, c, c, [""] * 8, ["other"] * 8, 1.0)

    res = ExperimentResult(items, conds, [sc() for _ in conds], {}, 1.0)
    summary = analyze(res)
    report = {"suite": {**Suite().__dict__, "formats": ["chat"], "sets": ["shorter"]}, "config": {"model": "embedded"},
              "cells": [{"format": "chat", "set": "shorter", "x_range": [13, 40], "pairs": 4, "heldout": False,
                         "stem": "", "summary": summary}],
              "pooled": analyze(concat([res], {})), "seconds": 60.0,
              "copy_check": {"n": 8, "prompt": "Repeat this number exactly: X", "complete": 1.0, "first_diff": 0.5,
                             "token_sum": 0.5}}
    report["verdict"] = suite_verdict(report)
    folder = tmp_path / "data" / "reports" / "replication-test"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(to_json(report))
    env.setenv("MONITOR_DATA_DIR", str(tmp_path / "data"))
    at = page(EXPERIMENTS)
    assert report["verdict"] in "\n".join(i.value for i in ok(at).info)
    _, effects = chart(at, "rep_effects")
    assert any("diff" in d.columns for d in effects)
    assert any("Scorer check" in m.value for m in at.markdown)
    at.file_uploader(key="rep_upload").set_value(("report.json", b'{"not": "a report"}', "application/json")).run()
    assert "not a replication report" in errors(ok(at))


def test_without_a_database_steering_explains_and_experiments_refuse_specs(env, tmp_path):
    env.setenv("MONITOR_DB", str(tmp_path / "nowhere.duckdb"))
    at = page(STEERING)
    assert any("Semantic steering needs the neuron database" in w.value and "No neuron database" in w.value
               for w in at.warning)
    at = page(EXPERIMENTS)
    at.text_area(key="w_exp_specs").set_value("Bible verses")
    at.number_input(key="w_exp_pairs").set_value(1)
    at.button(key="exp_run").click().run()
    assert "Steering specs need the neuron database" in errors(ok(at))
    assert not at.get("vega_lite_chart")
