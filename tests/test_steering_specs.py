"""Semantic steering: spec validation and serialisation, DB selection, union, random controls, exact suppression."""

from __future__ import annotations

import json
import re

import duckdb
import numpy as np
import pytest
import torch

from cache.key_map import key_codes
from engine.controls import random_control
from engine.generate import answer_probabilities, compare_generations, diff_tokens
from engine.specs import (
    MAX_K, ConceptSpec, Selection, layer_counts, specs_from_json, specs_from_url, specs_to_json, specs_to_url, union,
)
from engine.steering import parse_token_range, token_range_text
from engine.errors import MonitorError
from engine.steering import TokenRange, compile_interventions
from engine.trace import run_trace

MULTI = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Which is bigger: 9.8 or 9.11? Genesis 1:3 says light."},
]


# --------------------------------------------------------------------------- specs
def test_spec_defaults_follow_the_reference():
    s = ConceptSpec("  Bible   verses ")
    assert (s.concept, s.mode, s.k, s.strength, s.tokens, s.enabled) == ("Bible verses", "suppress", 500, 0.0,
                                                                        TokenRange("last_user"), True)
    t = ConceptSpec("love", mode="strengthen")
    assert (t.k, t.strength) == (50, 0.75)
    assert ConceptSpec("x", k=MAX_K).k == 1000


@pytest.mark.parametrize("kwargs, needle", [
    (dict(concept=""), "concept is empty"),
    (dict(concept="   "), "concept is empty"),
    (dict(concept="x", k=0), "out of range"),
    (dict(concept="x", k=1001), "out of range"),
    (dict(concept="x", k=2.5), "whole number"),
    (dict(concept="x", mode="amplify"), "suppress or strengthen"),
    (dict(concept="x", strength=0.5), "strengthen"),
    (dict(concept="x", mode="strengthen", strength=float("nan")), "finite"),
    (dict(concept="x", layer_range=(5, 2)), "Layer range"),
    (dict(concept="x", polarity=0), "Polarity"),
    (dict(concept="x", tokens="prompt+last_user"), "contradictory"),
    (dict(concept="x", tokens="positions:3-7,5-9"), "overlap"),
    (dict(concept="x", tokens="positions:7-3"), "reversed"),
    (dict(concept="x", tokens=TokenRange("prompt", positions=(1, 2))), "contradictory"),
    (dict(concept="x", tokens={"kind": "positions", "positions": [3, 3]}), "twice"),
    (dict(concept="x", tokens="everything"), "Unknown token range"),
    (dict(concept="x", neurons=[(1, 2, 0)]), "malformed"),
    (dict(concept="x", neurons=[]), "empty"),
])
def test_bad_specs_raise_monitor_error(kwargs, needle):
    with pytest.raises(MonitorError, match=needle):
        ConceptSpec(**kwargs)


def test_token_range_text_round_trip():
    for text in ["last_user", "prompt", "prompt+generated", "last_user+generated", "positions:3-7,9",
                 "positions:0+generated"]:
        tr = parse_token_range(text)
        assert token_range_text(tr) == text
        assert parse_token_range(tr.to_dict()) == tr
    assert parse_token_range("positions:3-5").positions == (3, 4, 5)


def test_short_form_parse():
    s = ConceptSpec.parse("Bible verses:suppress:500")
    assert (s.concept, s.mode, s.k) == ("Bible verses", "suppress", 500)
    assert ConceptSpec.parse("Genesis 1:3").concept == "Genesis 1:3"  # no mode: the whole text is the concept
    t = ConceptSpec.parse("dates:strengthen:40:strength=1.5:layers=2-20:min_score=0.1:keyword=date:polarity=-1:"
                          "tokens=positions:3-7+generated")
    assert (t.mode, t.k, t.strength, t.layer_range, t.min_score, t.keyword, t.polarity) == (
        "strengthen", 40, 1.5, (2, 20), 0.1, "date", -1)
    assert t.tokens == TokenRange("positions", (3, 4, 5, 6, 7), True)
    assert ConceptSpec.parse(t.short()) == t
    for bad, needle in [("x:suppress:many", "whole number"), ("x:suppress:5:colour=red", "Unknown steering field"),
                        ("x:suppress:5:layers=a", "Bad layers"), ("", "empty"), (":suppress", "concept is empty")]:
        with pytest.raises(MonitorError, match=needle):
            ConceptSpec.parse(bad)


def test_json_and_url_round_trip():
    specs = [
        ConceptSpec("Bible verses"),
        ConceptSpec("dates", k=120, layer_range=(3, 20), min_score=0.05, keyword="date", polarity=1,
                    tokens="prompt+generated", enabled=False),
        ConceptSpec("love", mode="strengthen", strength=1.25),
        ConceptSpec("cluster 3", neurons=[(1, 2, 1), (3, 4, -1), (1, 2, 1)]),  # repeats dropped
    ]
    assert specs[3].neurons == ((1, 2, 1), (3, 4, -1)) and specs[3].k == 2
    assert specs_from_json(specs_to_json(specs)) == specs
    url = specs_to_url(specs)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", url)
    assert specs_from_url(url) == specs
    assert len(specs_to_url([ConceptSpec("Bible verses")])) < 60


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ('[{"concept": "x", "colour": 1}]', "Unknown steering-spec field"),
    ('[{"mode": "suppress"}]', "needs a concept"),
    ('[{"concept": "x", "k": 5000}]', "out of range"),
    ('"just a string"', "list of spec objects"),
])
def test_malformed_json_raises(text, needle):
    with pytest.raises(MonitorError, match=needle):
        specs_from_json(text)


def test_malformed_url_raises():
    good = specs_to_url([ConceptSpec("Bible verses"), ConceptSpec("dates")])
    for bad in ["", "x1.abc", good[:-6], good[:10] + "!!" + good[12:], "c1." + "A" * 8]:
        with pytest.raises(MonitorError, match="link"):
            specs_from_url(bad)


# --------------------------------------------------------------------------- union and controls
def _sel(concept, neurons, sims, **kw):
    return Selection(ConceptSpec(concept, **kw), neurons, sims)


def test_union_deduplicates_and_reports_overlap():
    a = _sel("a", [(1, 1, 1), (1, 1, -1), (1, 2, 1), (2, 5, 1)], [0.9, 0.8, 0.7, 0.6])
    b = _sel("b", [(1, 2, -1), (2, 5, 1), (3, 3, 1)], [0.95, 0.5, 0.4])
    u = union([a, b])
    assert u.neurons == [(1, 1), (1, 2), (2, 5), (3, 3)]
    assert u.duplicates == 3  # (1,1,-1) within a; (1,2) and (2,5) across specs: suppression is the same effect
    assert u.conflicts == []
    assert len(u.interventions) == 1 and u.interventions[0].strength == 0
    assert sorted((l, n) for l, n, _ in u.steered) == u.neurons  # every neuron once
    (ov,) = u.overlap
    assert ov["shared"] == 2 and ov["jaccard"] == pytest.approx(2 / 4)
    assert u.per_layer() == {1: 2, 2: 1, 3: 1}
    assert union([a, _sel("off", [(9, 9, 1)], [1.0], enabled=False)]).neurons == [(1, 1), (1, 2), (2, 5)]


def test_union_resolves_contradictions_by_similarity():
    up = _sel("up", [(1, 1, 1), (2, 2, 1)], [0.9, 0.3], mode="strengthen")
    down = _sel("down", [(1, 1, -1), (2, 2, -1)], [0.5, 0.8], mode="strengthen")
    off = _sel("off", [(2, 2, 1)], [0.85])
    u = union([up, down, off])
    kept = {(l, n): p for l, n, p in u.steered}
    assert kept == {(1, 1): 1, (2, 2): 1}  # (1,1): up 0.9 > down 0.5; (2,2): suppress 0.85 > down 0.8 > up 0.3
    by_mode = {iv.strength: iv.neurons for iv in u.interventions}
    assert by_mode == {0.75: [(1, 1, 1)], 0.0: [(2, 2, 1)]}
    assert {(c["layer"], c["neuron"], c["dropped"]["spec"].split(" (")[0]) for c in u.conflicts} == {
        (1, 1, "down"), (2, 2, "down"), (2, 2, "up")}


def test_union_output_compiles(tiny_lm):
    """The engine accepts a union with contradictions resolved (it raises on contradictory cells)."""
    from engine.chat import render_chat

    up = _sel("up", [(1, 1, 1), (2, 2, 1)], [0.9, 0.3], mode="strengthen")
    down = _sel("down", [(1, 1, -1), (2, 2, -1)], [0.5, 0.8], mode="strengthen", tokens="prompt")
    u = union([up, down])
    q = {1: np.ones((3, 96), np.float32), -1: -np.ones((3, 96), np.float32)}
    compiled = compile_interventions(u.interventions, render_chat(tiny_lm.tokenizer, MULTI), 3, 96, q)
    assert compiled


def test_random_control_matches_per_layer_counts():
    a = _sel("a", [(l, n, 1 if n % 2 else -1) for l in (0, 3, 7) for n in range(0, 40 * (l + 1), 3)],
             [0.5] * sum(len(range(0, 40 * (l + 1), 3)) for l in (0, 3, 7)))
    b = _sel("b", [(5, n, 1) for n in range(10)], [0.4] * 10, mode="strengthen", tokens="prompt+generated")
    u = union([a, b])
    ctl = random_control(u.interventions, n_neurons=1536, seed=3)
    assert [layer_counts((l, n) for l, n, _ in iv.neurons) for iv in ctl] == \
        [layer_counts((l, n) for l, n, _ in iv.neurons) for iv in u.interventions]
    ctl_pairs = {(l, n) for iv in ctl for l, n, _ in iv.neurons}
    assert not ctl_pairs & set(u.neurons) and len(ctl_pairs) == len(u.neurons)
    for c, iv in zip(ctl, u.interventions):
        assert (c.mode, c.strength, c.tokens) == (iv.mode, iv.strength, iv.tokens)
        assert sorted(p for *_, p in c.neurons) == sorted(p for *_, p in iv.neurons)
    again = random_control(u.interventions, 1536, seed=3)
    assert [c.neurons for c in again] == [c.neurons for c in ctl]
    assert [c.neurons for c in random_control(u.interventions, 1536, seed=4)] != [c.neurons for c in ctl]


def test_diff_tokens_marks_changes():
    ca, cb, first = diff_tokens([1, 2, 3, 4], [1, 2, 9, 4, 5])
    assert ca == [False, False, True, False] and cb == [False, False, True, False, True] and first == 2
    assert diff_tokens([1, 2], [1, 2]) == ([False, False], [False, False], None)


# --------------------------------------------------------------------------- against the database
@pytest.fixture(scope="module")
def db(embedded_db):
    from cache.db import open_database

    with open_database(embedded_db) as handle:
        yield handle


@pytest.fixture(scope="module")
def all_embeddings(embedded_db):
    con = duckdb.connect(str(embedded_db), read_only=True)
    try:
        rows = con.execute("SELECT e.layer, e.neuron, e.polarity, e.vec, d.score FROM embeddings e JOIN descriptions d "
                           "USING (layer, neuron, polarity)").fetchall()
    finally:
        con.close()
    keys = np.array([r[:3] for r in rows], np.int64)
    vecs = np.array([r[3] for r in rows], np.float64)
    scores = np.array([np.nan if r[4] is None else r[4] for r in rows])
    return keys, vecs, scores


@pytest.mark.parametrize("spec", [
    ConceptSpec("Bible verses", k=40),
    ConceptSpec("calendar dates and months", k=25, layer_range=(10, 25), polarity=-1),
    ConceptSpec("decimal numbers", mode="strengthen", k=15, min_score=0.1),
])
def test_selection_equals_hand_computed_top_k(db, all_embeddings, spec):
    from concepts.resolve import select
    from cache.embedder import embed

    keys, vecs, scores = all_embeddings
    q = embed(spec.concept)[0].astype(np.float64)
    sims = vecs @ q / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(q))
    ok = np.ones(len(keys), bool)
    if spec.layer_range:
        ok &= (keys[:, 0] >= spec.layer_range[0]) & (keys[:, 0] <= spec.layer_range[1])
    if spec.polarity:
        ok &= keys[:, 2] == spec.polarity
    if spec.min_score is not None:
        ok &= scores >= spec.min_score
    idx = np.flatnonzero(ok)
    # exact ties (identical summaries embed identically) go by key, as the index promises
    codes = key_codes(keys[:, 0], keys[:, 1], keys[:, 2], db.n_neurons)
    top = idx[np.lexsort((codes[idx], -sims[idx]))[: spec.k]]
    sel = select(db, spec)
    assert len(sel) == spec.k
    assert set(sel.neurons) == {tuple(int(v) for v in keys[i]) for i in top}
    np.testing.assert_allclose(sel.similarity, sims[top], atol=1e-5)
    assert sel.similarity == sorted(sel.similarity, reverse=True)


def test_explicit_neurons_skip_search_and_bad_filters_raise(db):
    from concepts.resolve import resolve, select

    spec = ConceptSpec("my cluster", neurons=[(0, 5, 1), (8, 7, -1)])
    assert select(db, spec).neurons == [(0, 5, 1), (8, 7, -1)]
    with pytest.raises(MonitorError, match="out of range"):
        select(db, ConceptSpec("x", neurons=[(99, 1, 1)]))
    with pytest.raises(MonitorError, match="Layer range"):
        select(db, ConceptSpec("x", layer_range=(0, 99)))
    r = resolve(db, [ConceptSpec("dates", mode="strengthen", k=10)])
    u, q = r.union, r.quantiles
    assert q is not None and set(q) == {1, -1} and len(u) <= 10


def test_suppression_zeroes_exactly_the_spec_neurons_on_exactly_its_tokens(lm, db):
    from concepts.resolve import resolve
    from engine.chat import render_chat

    rendered = render_chat(lm.tokenizer, MULTI)
    start, end = rendered.last_turn("user")
    base = run_trace(lm, MULTI).activations  # [layers, tokens, neurons]
    for tokens, lo, hi in [("last_user", start, end), ("prompt", 0, len(rendered))]:
        r = resolve(db, [ConceptSpec("Bible verses", k=120, tokens=tokens), ConceptSpec("dates", k=120, tokens=tokens)])
        u, q = r.union, r.quantiles
        steered = run_trace(lm, MULTI, interventions=u.interventions, quantiles=q).activations
        mask = torch.zeros_like(base, dtype=torch.bool)
        for l, n in u.neurons:
            mask[l, lo:hi, n] = True
        assert torch.all(steered[mask] == 0)  # the chosen cells are exactly zero
        assert (base[mask] != 0).float().mean() > 0.99  # and they were not zero before
        first_layer = min(l for l, _ in u.neurons)
        # Nothing changes below the first steered layer, nor before the range anywhere (causality).
        assert torch.equal(steered[:first_layer], base[:first_layer])
        assert torch.equal(steered[:, :lo], base[:, :lo])
        # At the first steered layer only the chosen cells differ (its activations are computed before the hook).
        diff = steered[first_layer] != base[first_layer]
        assert torch.equal(diff, mask[first_layer] & (base[first_layer] != 0))
        if hi < len(rendered):  # tokens after the range are not suppressed
            after = torch.stack([steered[l, hi:, n] for l, n in u.neurons])
            assert (after != 0).float().mean() > 0.99


def test_compare_generations_and_answer_probabilities(lm, db):
    from concepts.resolve import resolve

    chat = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]
    r = resolve(db, [ConceptSpec("dates", k=300, tokens="prompt+generated")])
    u, q = r.union, r.quantiles
    d = compare_generations(lm, chat, u.interventions, q, max_new_tokens=4)
    assert len(d.base_changed) == len(d.base.token_ids) and len(d.steered_changed) == len(d.steered.token_ids)
    if d.first_divergence is None:
        assert not any(d.base_changed) and not any(d.steered_changed)
    else:
        assert d.base.token_ids[: d.first_divergence] == d.steered.token_ids[: d.first_divergence]
    json.dumps(d.to_dict())
    rows = answer_probabilities(lm, chat, ["9.8", "9.11"], u.interventions, q, prefix="The bigger number is ")
    assert [r["candidate"] for r in rows] == ["9.8", "9.11"]
    assert sum(r["share_before"] for r in rows) == pytest.approx(1.0)
    assert all(r["prob_before"] == pytest.approx(np.exp(r["logprob_before"])) for r in rows)
    assert any(abs(r["delta_logprob"]) > 1e-4 for r in rows)
