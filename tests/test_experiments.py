"""Experiments: prompt sets, batched scoring against the engine's own functions, statistics, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.specs import ConceptSpec, Selection
from engine.errors import MonitorError
from engine.experiments import analyze, build_conditions, run_experiment, to_markdown
from engine.prompt_sets import (DEFAULT_FORMATS, DEFAULT_SETS, DEFAULT_X_RANGE, FORMATS, Item, decimal_items,
                                decimal_pairs, format_items, is_date, load_items, pair_ids, parse_items, sample_items)
from engine.scoring import judge, prepare, score
from engine.generate import generate
from engine.stats import (accuracy_summary, cluster_bootstrap, cluster_bootstrap_ci, holm, mcnemar_exact, null_position,
                          paired_sign_test, wilson_ci)
from engine.steering import Intervention, TokenRange

from .conftest import ROOT


# --------------------------------------------------------------------------- prompt sets
def test_decimal_items_keep_the_classic_grid():
    items = decimal_items()
    assert len(items) == 1280 and len({(i.prompt, i.correct, i.wrong) for i in items}) == 1280
    for it in items:
        assert float(it.correct) > float(it.wrong)
        assert len(it.correct.split(".")[1]) == 1 and len(it.wrong.split(".")[1]) == 2
        assert it.prompt in (f"Which is bigger: {it.correct} or {it.wrong}?", f"Which is bigger: {it.wrong} or {it.correct}?")
    assert ("Which is bigger: 9.8 or 9.11?", "9.8", "9.11") in {(i.prompt, i.correct, i.wrong) for i in items}
    assert len(set(pair_ids(items))) == 640  # both orders of a question share its pair id
    longer = decimal_items(larger="longer")
    assert all(float(i.correct) > float(i.wrong) and len(i.correct) > len(i.wrong) for i in longer)
    assert decimal_items("Compare {b} with {a}.")[0].prompt == "Compare 1.11 with 1.2."
    with pytest.raises(MonitorError, match=r"\{a\} and \{b\}"):
        decimal_items("Which is bigger?")
    a, b = sample_items(items, 50, seed=1), sample_items(items, 50, seed=1)
    assert a == b and len(set(a)) == 50 and a != sample_items(items, 50, seed=2)


@pytest.mark.parametrize("kind", ["shorter", "longer", "equal", "classic"])
def test_generated_sets_have_no_shortcut_they_do_not_claim(kind):
    x_range = (1, 10) if kind == "classic" else DEFAULT_X_RANGE
    pairs = decimal_pairs(kind, x_range)
    n_x = x_range[1] - x_range[0] + 1
    assert len(pairs) == n_x * {"shorter": 252, "longer": 396, "equal": 324, "classic": 64}[kind]  # as documented
    assert len(set(pairs)) == len(pairs)
    for big, small in pairs:
        assert float(big) > float(small) and big.split(".")[0] == small.split(".")[0]
        db, ds = len(big.split(".")[1]), len(small.split(".")[1])
        if kind == "shorter":
            assert db < ds and small.split(".")[1][0] != "1"  # the wrong answer never starts .1
        elif kind == "longer":
            assert db > ds
        elif kind == "equal":
            assert db == ds == 2
    if kind != "classic":
        assert not any(is_date(n) for p in pairs for n in p)  # whole parts 13-40: no month
    else:
        assert any(is_date(p[1]) for p in pairs)
        assert all(p[1].split(".")[1].startswith("1") for p in pairs)  # the confound, kept for comparison
    if kind != "equal":  # every X.Y with X ≤ 12 is a date: nothing is left, and it says so
        with pytest.raises(MonitorError, match="no pairs"):
            decimal_pairs(kind, (1, 12), dates=False)
    else:
        undated = decimal_pairs(kind, (1, 12), dates=False)
        assert undated and not any(is_date(n) for p in undated for n in p)
    items = format_items(pairs[:20], "chat")
    assert len(items) == 40
    for a, b in zip(items[::2], items[1::2]):  # both orders, one pair id, the correct answer first in one of them
        assert a.pair == b.pair and (a.correct, a.wrong) == (b.correct, b.wrong)
        assert a.prompt == f"Which is bigger: {a.correct} or {a.wrong}?" and b.prompt == f"Which is bigger: {b.wrong} or {b.correct}?"
    assert is_date("9.11") and is_date("2.29") and not is_date("9.80") and not is_date("13.5") and not is_date("2.30")


def test_formats_render_their_context():
    pairs = [("15.8", "15.64")]
    chat = format_items(pairs, "chat")[0].chat()
    assert chat == [{"role": "user", "content": "Which is bigger: 15.8 or 15.64?"}]
    system = format_items(pairs, "system")[0].chat()
    assert system[0]["role"] == "system" and FORMATS["system"].stem == ""
    shots = format_items(pairs, "fewshot")[0].chat()
    assert [m["role"] for m in shots] == ["user", "assistant"] * 3 + ["user"]
    assert shots[1]["content"] == "The bigger number is 0.7." and shots[3]["content"] == "The bigger number is 0.45."
    assert isinstance(format_items(pairs, "plain")[0].chat(), str)
    assert len(DEFAULT_FORMATS) >= 4 and len(DEFAULT_SETS) >= 3
    with pytest.raises(MonitorError, match="Unknown question format"):
        format_items(pairs, "nope")
    with pytest.raises(MonitorError, match="Unknown prompt set"):
        decimal_pairs("nope")


def test_load_items(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "Capital of France?", "correct": "Paris", "wrong": "Lyon"}\n\n'
                    '{"prompt": "2+2?", "correct": "4", "wrong": "5"}\n')
    assert load_items(good) == [Item("Capital of France?", "Paris", "Lyon"), Item("2+2?", "4", "5")]
    cases = [('{"prompt": "x", "correct": "a"', "p.jsonl:1 is not valid JSON"),
             ('{"prompt": "x", "correct": "a"}', "needs non-empty string fields"),
             ('{"prompt": "x", "correct": "a", "wrong": "a"}', "same correct and wrong"),
             ("", "no prompts")]
    for text, needle in cases:
        good.write_text(text)
        with pytest.raises(MonitorError, match=needle):
            load_items(good)
    assert parse_items('{"prompt": "a", "correct": "b", "wrong": "c"}') == [Item("a", "b", "c")]
    with pytest.raises(MonitorError, match="upload.jsonl:2 is not valid JSON"):
        parse_items('{"prompt": "a", "correct": "b", "wrong": "c"}\n{', "upload.jsonl")
    with pytest.raises(MonitorError, match="No prompt file"):
        load_items(tmp_path / "missing.jsonl")


def test_judge():
    assert judge("9.8.", "9.8", "9.11") == "correct"
    assert judge("9.11 is bigger", "9.8", "9.11") == "wrong"
    assert judge("9.80", "9.8", "9.11") == "correct"
    assert judge("9.1", "9.8", "9.11") == "other"
    assert judge("To solve this", "9.8", "9.11") == "other"
    assert judge("Paris, not Lyon", "Paris", "Lyon") == "correct"
    assert judge("Lyon. Or Paris", "Paris", "Lyon") == "wrong"


# --------------------------------------------------------------------------- statistics
def _clustered(rng, n_pairs, p, rho):
    """Two orders per pair: the second copies the first with probability rho, else is drawn afresh."""
    first = rng.random(n_pairs) < p
    second = np.where(rng.random(n_pairs) < rho, first, rng.random(n_pairs) < p)
    return np.column_stack([first, second]).reshape(-1).astype(float), np.repeat(np.arange(n_pairs), 2)


@pytest.mark.parametrize("p, rho", [(0.5, 1.0), (0.85, 0.5), (0.97, 0.0)])
def test_wilson_over_pairs_covers_and_the_item_interval_does_not(p, rho):
    """95% coverage by simulation (2,000 experiments of 30 pairs): the interval over pairs holds it;
    treating the 60 items as independent undercovers when the two orders agree."""
    rng = np.random.default_rng(1)
    hits, naive = 0, 0
    for _ in range(2000):
        x, clusters = _clustered(rng, 30, p, rho)
        s = accuracy_summary(x, clusters, n_boot=1)
        hits += s["lo"] <= p <= s["hi"]
        lo, hi = wilson_ci(x.sum(), len(x))
        naive += lo <= p <= hi
    assert hits / 2000 >= 0.93
    if rho == 1.0:
        assert naive / 2000 < 0.90  # the failure the clustering fixes


def test_intervals_never_collapse_and_match_the_formula():
    lo, hi = wilson_ci(30, 30)
    assert hi == 1.0 and lo == pytest.approx(30 / (30 + 1.959964 ** 2), rel=1e-5) and lo < 1
    lo, hi = wilson_ci(0, 30)
    assert lo == 0.0 and 0 < hi < 0.15
    z, n, k = 1.959964, 50, 20  # by hand
    c, h = (k / n + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_ci(k, n) == pytest.approx((c - h, c + h), rel=1e-6)
    s = accuracy_summary(np.ones(20), np.repeat(np.arange(10), 2))
    assert s["acc"] == 1.0 and s["hi"] == 1.0 and s["lo"] < 0.8 and s["n_clusters"] == 10


def test_cluster_bootstrap_resamples_pairs():
    x = np.repeat([1.0, 0.0] * 10, 2)  # 20 pairs whose two orders always agree
    clusters = np.repeat(np.arange(20), 2)
    assert cluster_bootstrap_ci(x, clusters, seed=3) == cluster_bootstrap_ci(x, clusters, seed=3)
    lo_c, hi_c = cluster_bootstrap_ci(x, clusters, seed=0)
    lo_i, hi_i = cluster_bootstrap_ci(x, None, seed=0)
    assert (hi_c - lo_c) > 1.25 * (hi_i - lo_i)  # ≈ √2 wider: half as many independent units
    reps = cluster_bootstrap(x, clusters, n_boot=5000, seed=1)
    assert reps.std() == pytest.approx(np.sqrt(0.25 / 20), rel=0.1)


def test_paired_tests_match_the_binomial_by_hand():
    from math import comb

    a = np.array([1] * 10 + [0] * 3 + [1] * 20 + [0] * 7, float)
    b = np.array([0] * 10 + [1] * 3 + [1] * 20 + [0] * 7, float)
    res = mcnemar_exact(a, b)
    assert (res["a_only"], res["b_only"]) == (10, 3)
    by_hand = 2 * sum(comb(13, k) for k in range(0, 4)) / 2 ** 13
    assert res["p"] == pytest.approx(by_hand)
    assert mcnemar_exact(a, a)["p"] == 1.0
    # on pairs: the two orders of a pair count once, ties (½) count by their sign
    clusters = np.repeat(np.arange(20), 2)
    x, y = np.zeros(40), np.zeros(40)
    x[:12] = 1.0  # 6 pairs right in both orders under x
    x[12] = 0.5   # one half-right item
    r = paired_sign_test(x, y, clusters)
    assert (r["a_better"], r["b_better"]) == (7, 0) and r["p"] == pytest.approx(2 / 2 ** 7)


def test_holm_and_the_null_position_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, float("nan"), 0.01])[1] != holm([0.2, float("nan"), 0.01])[1]  # NaN stays NaN
    assert holm([0.2, float("nan"), 0.01])[::2] == pytest.approx([0.2, 0.02])
    null = np.arange(-10, 10) / 100.0  # 20 controls, −0.10 … +0.09
    pos = null_position(0.2, null)
    assert pos["beyond_all"] and pos["percentile"] == 100 and pos["p_empirical"] == pytest.approx(1 / 21)
    from scipy.stats import t as student_t

    t = (0.2 - null.mean()) / (null.std(ddof=1) * np.sqrt(1 + 1 / 20))
    assert pos["p_t"] == pytest.approx(2 * student_t.sf(t, 19))
    mid = null_position(0.0, null)
    assert not mid["beyond_all"] and mid["percentile"] == pytest.approx(52.5) and mid["p_empirical"] > 0.4


def test_batched_greedy_equals_generate(lm):
    """With an empty stem, batched greedy decoding reproduces engine.generate (steered, generated tokens too)."""
    ivs = [Intervention([(l, n, 1) for l in (2, 8, 15) for n in range(0, 1536, 3)], "replace", 0.0,
                        tokens=TokenRange("last_user", generated=True))]
    items = [Item("Which is bigger: 9.8 or 9.11?", "apple", "pear"), Item("Which is bigger: 4.14 or 4.8?", "apple", "pear")]
    prep = prepare(lm, items, prefix="")
    for iv in (None, ivs):
        sc = score(lm, prep, iv, max_new_tokens=4, batch_size=2)
        for it, reply in zip(items, sc.greedy):
            ref = generate(lm, [{"role": "user", "content": it.prompt}], max_new_tokens=4, interventions=iv)
            assert reply == ref.text


def test_conditions_controls_matched_per_spec_and_the_report(lm):
    sel_a = Selection(ConceptSpec("a", k=30), [(5, n, 1) for n in range(30)], [0.5] * 30)
    sel_b = Selection(ConceptSpec("b", k=20), [(5, n, 1) for n in range(20, 30)] + [(9, n, -1) for n in range(10)],
                      [0.4] * 20)
    mass = np.abs(np.random.default_rng(0).normal(size=(lm.n_layers, lm.n_neurons)))
    conds = build_conditions([sel_a, sel_b], lm.n_neurons, controls=2, seed=7, mass=mass)
    assert [c.kind for c in conds] == ["baseline", "spec", "spec", "union"] + ["control"] * 4
    assert [c.of for c in conds[4:]] == ["a (suppress 30)"] * 2 + ["b (suppress 20)"] * 2
    assert conds[4].per_layer() == {5: 30} and conds[6].per_layer() == {5: 10, 9: 10}
    assert all(0.7 < c.mass_ratio < 1.4 for c in conds[4:])  # matched on activation mass
    taken = {(l, n) for c in conds[1:3] for iv in c.interventions for l, n, _ in iv.neurons}
    assert not any((l, n) in taken for c in conds[4:] for iv in c.interventions for l, n, _ in iv.neurons)
    items = format_items([("9.8", "9.11"), ("3.2", "3.16")], "chat")
    conds = conds[:2] + conds[4:6]  # baseline, spec a, its two controls: enough for the report's structure
    result = run_experiment(lm, items, conds, max_new_tokens=8, batch_size=4, config={"model": "embedded"})
    summary = analyze(result, seed=0)
    rows = summary["conditions"]
    assert [r["kind"] for r in rows] == ["baseline", "spec", "control", "control"] and summary["n_pairs"] == 2
    for r in rows[:2]:
        assert r["complete"]["n_clusters"] == 2 and r["greedy"]["n"] == 4 and 0 <= r["greedy"]["valid_rate"] <= 1
    assert all("greedy" not in r for r in rows[2:])  # controls are not decoded unless asked
    spec = rows[1]
    assert spec["complete"]["vs_controls"]["n"] == 2 and "vs_controls" not in rows[2]["complete"]
    assert "p_holm" in spec["complete"]["vs_baseline"] and set(spec["verdict"]) == {"complete", "greedy"}
    md = to_markdown(summary)
    assert md.count("\n| ") == 2 and "a (suppress 30)" in md and summary["verdict"] in md  # controls folded
    assert to_markdown(summary, include_controls=True).count("\n| ") == 4
    json.dumps(summary)


def test_matched_controls_follow_the_mass_and_repeat_with_the_seed(lm):
    from engine.controls import activation_mass, matched_controls

    chats = [it.chat() for it in format_items([("15.8", "15.64"), ("22.4", "22.35")], "chat")]
    mass = activation_mass(lm, chats)
    assert mass.shape == (lm.n_layers, lm.n_neurons) and (mass >= 0).all()
    # by hand for one neuron: Σ |a| over the last user turn, averaged over the chats
    from engine.chat import render_chat
    from engine.hooks import NeuronHooks

    want = 0.0
    for c in chats:
        r = render_chat(lm.tokenizer, c)
        s, e = r.last_turn("user")
        with torch.inference_mode(), NeuronHooks(lm, capture=True) as h:
            lm.model(input_ids=r.input_ids[None])
        want += float(h.captured[7][0, s:e, 123].abs().sum())
    assert mass[7, 123] == pytest.approx(want / len(chats), rel=1e-4)
    heavy = [(l, int(n), 1) for l in (3, 12) for n in np.argsort(-mass[l])[5:400:20]]  # heavy, but not the very top
    iv = [Intervention(heavy, "replace", 0.0)]
    matched = matched_controls(iv, lm.n_neurons, 5, seed=1, mass=mass)
    uniform = matched_controls(iv, lm.n_neurons, 5, seed=1)
    assert all(0.85 < info["mass_ratio"] < 1.15 for _, info in matched)
    ratio_u = [sum(mass[l, n] for l, n, _ in ivs[0].neurons) / sum(mass[l, n] for l, n, _ in heavy) for ivs, _ in uniform]
    assert max(ratio_u) < 0.75  # uniform draws remove less activation than these heavy neurons
    assert matched_controls(iv, lm.n_neurons, 5, seed=1, mass=mass)[2][0][0].neurons == matched[2][0][0].neurons


# --------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", "experiment", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_cli_decimals_json_and_markdown(embedded_db, tmp_path):
    md = tmp_path / "table.md"
    res = _cli("decimals", "--model", "embedded", "--db", str(embedded_db), "--steer", "Bible verses:suppress:50",
               "--steer", "dates:suppress:50", "--concept-control", "decimal numbers:suppress:50", "--controls", "2",
               "--pairs", "2", "--seed", "3", "--set", "equal", "--format", "fewshot", "--max-new-tokens", "6",
               "--json", "--markdown", str(md))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    names = [r["name"] for r in out["conditions"]]
    assert names[:5] == ["baseline", "Bible verses (suppress 50)", "dates (suppress 50)", "union of Bible verses + dates",
                         "decimal numbers (suppress 50) [concept control]"]
    assert [r["kind"] for r in out["conditions"][5:]] == ["control"] * 4
    assert out["n"] == 4 and out["n_pairs"] == 2 and out["config"]["db"] == str(embedded_db)
    assert out["config"]["set"] == "equal" and out["config"]["format"] == "fewshot" and out["config"]["mass_matched"]
    assert out["conditions"][5]["per_layer"] == out["conditions"][1]["per_layer"]
    assert md.read_text().startswith("| condition |")


def test_cli_replicate_writes_the_report(embedded_db, tmp_path):
    out = tmp_path / "report"
    res = _cli("replicate", "--model", "embedded", "--db", str(embedded_db), "--steer", "dates:suppress:40",
               "--concept-control", "decimal numbers:suppress:40", "--formats", "chat,system", "--sets", "shorter",
               "--pairs", "2", "--controls", "2", "--k", "10", "--max-new-tokens", "6", "--out", str(out), "--html")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert [(c["format"], c["set"]) for c in report["cells"]] == [("chat", "shorter"), ("system", "shorter"),
                                                                  ("heldout", "shorter")]
    assert report["cells"][2]["x_range"] == [41, 99] and report["pooled"]["n_pairs"] == 4
    assert {p["k"] for p in report["doses"]["points"]} == {10, 40}
    assert set(report["copy_check"]) >= {"complete", "first_diff", "token_sum"}
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "chart-1.svg" in md and (out / "chart-1.svg").read_text().startswith("<svg")
    html = (out / "report.html").read_text()
    assert "<svg" in html and "<table>" in html and "Scorer check" in html
    assert "Pooled over" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (("decimals", "--steer", "dates", "--db", "/no/such.duckdb", "--n", "2"), "No neuron database"),
    (("decimals", "--x-range", "40-13", "--n", "2"), "x-range"),
    (("decimals", "--k", "10,x", "--n", "2"), "comma-separated"),
    (("replicate", "--formats", "chat,nope", "--db", "/no/such.duckdb"), "Unknown format or set"),
    (("custom", "--n", "2"), "needs --file"),
    (("custom", "--file", "/no/such.jsonl"), "No prompt file"),
    (("decimals", "--steer", "dates:suppress:5000", "--n", "2"), "out of range"),
    (("decimals", "--steer-url", "c1.garbage!", "--n", "2"), "link"),
])
def test_cli_errors_are_one_line(args, needle):
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_cli_custom_bad_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "correct": "a", "wrong": "b"}\nnot json\n')
    res = _cli("custom", "--file", str(bad))
    assert res.returncode == 2 and "bad.jsonl:2 is not valid JSON" in res.stderr
