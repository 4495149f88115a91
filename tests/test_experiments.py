"""Experiments: prompt sets, batched scoring against the engine's own functions, statistics, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.specs import ConceptSpec, Selection
from engine.errors import MonitorError
from engine.experiments import analyze, build_conditions, run_experiment, to_markdown
from engine.prompt_sets import DECIMALS_PREFIX, Item, decimal_items, load_items, parse_items, sample_items
from engine.scoring import judge, prepare, score
from engine.generate import generate, sequence_logprob
from engine.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_diff_ci
from engine.steering import Intervention, TokenRange

from .conftest import ROOT


# --------------------------------------------------------------------------- prompt sets
def test_decimal_items():
    items = decimal_items()
    assert len(items) == 1280 and len(set(items)) == 1280
    for it in items:
        assert float(it.correct) > float(it.wrong)
        assert len(it.correct.split(".")[1]) == 1 and len(it.wrong.split(".")[1]) == 2
        assert it.prompt in (f"Which is bigger: {it.correct} or {it.wrong}?", f"Which is bigger: {it.wrong} or {it.correct}?")
    assert Item("Which is bigger: 9.8 or 9.11?", "9.8", "9.11") in items
    assert Item("Which is bigger: 9.11 or 9.8?", "9.8", "9.11") in items
    longer = decimal_items(larger="longer")
    assert all(float(i.correct) > float(i.wrong) and len(i.correct) > len(i.wrong) for i in longer)
    assert decimal_items("Compare {b} with {a}.")[0].prompt == "Compare 1.11 with 1.2."
    with pytest.raises(MonitorError, match=r"\{a\} and \{b\}"):
        decimal_items("Which is bigger?")
    a, b = sample_items(items, 50, seed=1), sample_items(items, 50, seed=1)
    assert a == b and len(set(a)) == 50 and a != sample_items(items, 50, seed=2)


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
def test_bootstrap_interval_contains_estimate_and_shrinks():
    rng = np.random.default_rng(0)
    widths = []
    for n in (25, 100, 400, 1600):
        x = rng.random(n) < 0.6
        lo, hi = bootstrap_ci(x, seed=1)
        assert lo <= x.mean() <= hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4 * 1.5
    # about 1.96·sqrt(p(1−p)/n) each side for large n
    assert widths[-1] == pytest.approx(2 * 1.96 * np.sqrt(0.24 / 1600), rel=0.15)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    x = rng.random(30) < 0.5
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)  # seeded: reproducible


def test_mcnemar_matches_binomial_by_hand():
    from math import comb

    a = np.array([1] * 10 + [0] * 3 + [1] * 20 + [0] * 7, bool)
    b = np.array([0] * 10 + [1] * 3 + [1] * 20 + [0] * 7, bool)
    res = mcnemar_exact(a, b)
    assert (res["a_only"], res["b_only"]) == (10, 3)
    by_hand = 2 * sum(comb(13, k) for k in range(0, 4)) / 2 ** 13
    assert res["p"] == pytest.approx(by_hand)
    assert mcnemar_exact(a, a)["p"] == 1.0
    lo, hi = paired_bootstrap_diff_ci(a, b, seed=0)
    assert lo <= a.mean() - b.mean() <= hi


# --------------------------------------------------------------------------- batched scoring
ITEMS = [Item("Which is bigger: 9.8 or 9.11?", "9.8", "9.11"), Item("Which is bigger: 3.16 or 3.2?", "3.2", "3.16"),
         Item("Which is bigger: 10.7 or 10.13?", "10.7", "10.13"), Item("Which is bigger: 4.14 or 4.8?", "4.8", "4.14"),
         Item("Which is bigger: 6.9 or 6.13?", "6.9", "6.13")]


@pytest.mark.parametrize("steer", [None, "last_user+generated"])
def test_batched_forced_choice_equals_sequence_logprob(lm, steer):
    ivs = None
    if steer:
        ivs = [Intervention([(l, n, 1) for l in (3, 10, 20) for n in range(0, 1536, 5)], "replace", 0.0,
                            tokens=TokenRange(steer.split("+")[0], generated="generated" in steer))]
    items = ITEMS[:3]
    prep = prepare(lm, items)
    assert len(prep.groups) == 2 and prep.common > 20  # two rendered lengths; the template is shared
    sc = score(lm, prep, ivs, batch_size=2, greedy=False)
    for it, m in zip(items, sc.margin):
        chat = [{"role": "user", "content": it.prompt}]
        ref = sequence_logprob(lm, chat, it.correct, ivs, prefix=DECIMALS_PREFIX) - \
            sequence_logprob(lm, chat, it.wrong, ivs, prefix=DECIMALS_PREFIX)
        assert m == pytest.approx(ref, abs=2e-3)
    assert list(sc.fc_correct) == [m > 0 for m in sc.margin]


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


def test_conditions_and_report(lm):
    sel_a = Selection(ConceptSpec("a", k=30), [(5, n, 1) for n in range(30)], [0.5] * 30)
    sel_b = Selection(ConceptSpec("b", k=20), [(5, n, 1) for n in range(20, 30)] + [(9, n, -1) for n in range(10)],
                      [0.4] * 20)
    conds = build_conditions([sel_a, sel_b], lm.n_neurons, controls=2, seed=7)
    assert [c.kind for c in conds] == ["baseline", "spec", "spec", "union", "control", "control"]
    union_layers = conds[3].per_layer()
    assert union_layers == {5: 30, 9: 10}
    assert all(c.per_layer() == union_layers for c in conds[4:]) and conds[4].seed == 7 and conds[5].seed == 8
    conds = conds[:1] + conds[3:5]  # baseline, union, one control: enough for the report's structure
    result = run_experiment(lm, ITEMS[:2], conds, max_new_tokens=3, batch_size=4, config={"model": "embedded"})
    summary = analyze(result, seed=0)
    rows = summary["conditions"]
    assert [r["kind"] for r in rows] == ["baseline", "union", "control"] and rows[1]["neurons"] == 40
    for r in rows:
        fc = r["forced_choice"]
        assert fc["lo"] <= fc["acc"] <= fc["hi"] and r["greedy"]["n"] == 2
    assert "vs_controls" in rows[1]["forced_choice"] and "vs_controls" not in rows[2]["forced_choice"]
    assert "vs_baseline" in rows[2]["greedy"] and "vs_baseline" not in rows[0]["greedy"]
    md = to_markdown(summary)
    assert md.count("\n| ") == len(rows) and "random control 1 (seed 7)" in md and summary["verdict"] in md
    json.dumps(summary)


# --------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", "experiment", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_cli_decimals_json_and_markdown(embedded_db, tmp_path):
    md = tmp_path / "table.md"
    res = _cli("decimals", "--model", "embedded", "--db", str(embedded_db), "--steer", "Bible verses:suppress:50",
               "--steer", "dates:suppress:50", "--controls", "1", "--n", "3", "--seed", "3", "--max-new-tokens", "3",
               "--json", "--markdown", str(md))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    names = [r["name"] for r in out["conditions"]]
    assert names == ["baseline", "Bible verses (suppress 50)", "dates (suppress 50)", "union of Bible verses + dates",
                     "random control 1 (seed 3)"]
    assert out["n"] == 3 and out["config"]["db"] == str(embedded_db)
    assert out["conditions"][-1]["per_layer"] == out["conditions"][3]["per_layer"]
    assert md.read_text().startswith("| condition |")


@pytest.mark.parametrize("args, needle", [
    (("decimals", "--steer", "dates", "--db", "/no/such.duckdb", "--n", "2"), "No neuron database"),
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
