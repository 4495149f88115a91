"""The answer scorer and the experiment's decision rule, checked on models whose answers are known.

* A hand-set bigram Llama (tests/bigram.py): equal true sequence probabilities tie whatever the
  token counts; prefix pairs are scored right both ways; a planted intervention that provably
  flips the answer is found specific and beyond every control.
* The embedded model: complete-answer scores equal an unbatched forward with the boundary mass
  summed by hand; the model copies a number, and the complete-answer scorer sees it (the
  length-biased token sum does not).
* The tiny random Llama: random neuron sets as "concepts" against random controls are called
  specific at most about 5% of the time over 100 draws (false-positive rate by simulation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.experiments import Condition, ExperimentResult, analyze, build_conditions, classify, run_experiment
from engine.prompt_sets import Item, decimal_pairs, format_items, sample_pairs
from engine.scoring import TIE_EPS, answer_logprobs, boundary_masks, prepare, score, score_many
from engine.specs import ConceptSpec, Selection
from engine.steering import Intervention, TokenRange

from .bigram import PLANT_LAYER, PLANT_NEURON, log_p

PICK = [{"role": "user", "content": "pick"}]


def _items(correct: str, wrong: str, n_pairs: int) -> list[Item]:
    return [Item(f"pick {i} {order}", correct, wrong, i) for i in range(n_pairs) for order in "ab"]


# --------------------------------------------------------------------------- the hand-set model
def test_equal_sequence_probabilities_tie_whatever_the_token_count(bigram_lm):
    """P("5", end) = 0.5·0.2 and P("5", "6", end) = 0.5·0.4·0.5: the same; only the complete score ties."""
    lp = answer_logprobs(bigram_lm, PICK, ["5", "56"])
    want = math.log(0.5) + log_p("5", "END")
    assert lp[0] == pytest.approx(want, abs=1e-5) and lp[1] == pytest.approx(want, abs=1e-5)
    sc = score(bigram_lm, prepare(bigram_lm, [Item("pick", "5", "56", 0), Item("pick", "56", "5", 1)], ""), greedy=False)
    assert np.abs(sc.margin).max() <= TIE_EPS
    assert sc.correct_of("complete").tolist() == [0.5, 0.5]  # a tie is half right, either way round
    # the two other definitions are not length-neutral, in opposite directions
    assert sc.margin_of("token_sum")[0] == pytest.approx(-math.log(0.4), abs=1e-4)  # the shorter one wins
    assert sc.margin_of("first_diff")[0] == pytest.approx(math.log(0.2 / 0.4), abs=1e-4)  # end vs "6": the longer


@pytest.mark.parametrize("correct, wrong", [("3.4", "3.47"), ("3.17", "3.1")])
def test_prefix_pairs_are_scored_right_in_both_directions(bigram_lm, correct, wrong):
    sc = score(bigram_lm, prepare(bigram_lm, [Item("pick", correct, wrong, 0)], ""), greedy=False)
    p = {c: math.exp(v) for c, v in zip((correct, wrong), sc.complete[0])}
    # by hand: 0.5 (the "3") · 1 (".") · 0.25 (the first decimal) · the rest of the path
    hand = {"3.4": 0.6, "3.47": 0.3 * 0.9, "3.1": 0.1, "3.17": 0.8 * 0.9}
    for c in (correct, wrong):
        assert p[c] == pytest.approx(0.5 * 1.0 * 0.25 * hand[c], rel=1e-4)
    assert sc.correct_of("complete")[0] == 1.0
    # the token sum without a boundary credits the prefix with its continuations: right only by accident
    assert sc.correct_of("token_sum")[0] == (1.0 if len(correct) < len(wrong) else 0.0)


def _planted(mode="strengthen", strength=0.01):
    spec = ConceptSpec("planted end-of-answer neuron", mode=mode, strength=strength if mode == "strengthen" else None,
                       neurons=((PLANT_LAYER, PLANT_NEURON, 1),), tokens="last_user+generated")
    return Selection.explicit(spec)


def test_a_planted_effect_is_found_specific_and_beyond_every_control(bigram_lm):
    """The planted neuron adds +10 nats to the end token on the answer: "3.8" (p ∝ 0.001 → ≈ 1) beats "3.89"."""
    q = {1: np.ones((bigram_lm.n_layers, bigram_lm.n_neurons)), -1: -np.ones((bigram_lm.n_layers, bigram_lm.n_neurons))}
    items = _items("3.8", "3.89", 15)
    conds = build_conditions([_planted()], bigram_lm.n_neurons, controls=20, seed=0)
    assert [c.kind for c in conds].count("control") == 20
    assert all(c.per_layer() == {PLANT_LAYER: 1} and (PLANT_LAYER, PLANT_NEURON, 1) not in c.interventions[0].neurons
               for c in conds if c.kind == "control")
    summary = analyze(run_experiment(bigram_lm, items, conds, q, "", greedy=False), seed=0)
    base, planted = summary["conditions"][:2]
    assert base["complete"]["acc"] == 0.0 and planted["complete"]["acc"] == 1.0
    assert base["complete"]["lo"] == 0.0 and 0 < base["complete"]["hi"] < 0.3  # Wilson never collapses
    vc = planted["complete"]["vs_controls"]
    assert vc["beyond_all"] and vc["percentile"] == 100 and vc["p_empirical"] == pytest.approx(1 / 21)
    assert planted["complete"]["vs_baseline"]["p_holm"] < 1e-3 and planted["verdict"]["complete"] == "specific"
    assert "specific effect" in summary["verdict"]
    # the zero-strength intervention (suppress: a ← 0, the silent neuron's own value) is no change, not specific
    zero = analyze(run_experiment(bigram_lm, items, build_conditions([_planted("suppress")], bigram_lm.n_neurons, 5),
                                  q, "", greedy=False))
    assert zero["conditions"][1]["verdict"]["complete"] == "no change"


# --------------------------------------------------------------------------- the embedded model
def test_complete_scores_equal_an_unbatched_forward_with_the_boundary_summed_by_hand(lm):
    from engine.chat import render_chat
    from engine.hooks import NeuronHooks
    from engine.steering import compile_interventions

    items = [Item("Which is bigger: 9.8 or 9.11?", "9.8", "9.11", 0), Item("Which is bigger: 3.16 or 3.2?", "3.2", "3.16", 1),
             Item("Which is bigger: 10.7 or 10.13?", "10.7", "10.13", 2), Item("Name a fruit.", "apple", "app", 3)]
    ivs = [Intervention([(l, n, 1) for l in (3, 10, 20) for n in range(0, 1536, 5)], "replace", 0.0,
                        tokens=TokenRange("last_user", generated=True))]
    stem = "The answer is "
    masks = boundary_masks(lm)
    pre = lm.tokenizer(stem, add_special_tokens=False)["input_ids"]

    def common(ids):  # how many stem tokens a candidate's tokenisation keeps (at least one token left over)
        return next(k for k in range(len(ids)) if k == len(pre) or k == len(ids) - 1 or ids[k] != pre[k])

    # the scorer runs the stem tokens every candidate keeps with the prompt; the rest counts as the answer
    shared = min(common(lm.tokenizer(stem + c, add_special_tokens=False)["input_ids"])
                 for it in items for c in (it.correct, it.wrong))
    for iv in (None, ivs):
        sc = score(lm, prepare(lm, items, stem), iv, batch_size=3, greedy=False)
        for i, it in enumerate(items):
            for j, cand in enumerate((it.correct, it.wrong)):
                r = render_chat(lm.tokenizer, it.chat())
                full = lm.tokenizer(stem + cand, add_special_tokens=False)["input_ids"]
                start = len(r) + shared
                ids = torch.tensor([r.input_ids.tolist() + full])
                comp = compile_interventions(iv or [], r, lm.n_layers, lm.n_neurons)
                with torch.inference_mode(), NeuronHooks(lm, interventions=comp):
                    logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
                toks = sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
                mask = masks.number_with_point if "." in cand else masks.text
                bound = float(torch.logsumexp(logp[-1][mask], 0))
                assert sc.token_sum[i, j] == pytest.approx(toks, abs=2e-3)
                assert sc.complete[i, j] == pytest.approx(toks + bound, abs=2e-3)


def test_the_scorer_sees_a_model_that_copies(lm):
    """A measurement that can fail: the model copies numbers; the complete scorer must say so, the
    length-biased token sum gets every prefix case wrong."""
    from engine.replication import copy_items

    items = copy_items(8, seed=3)
    sc = score(lm, prepare(lm, items, ""), max_new_tokens=16)  # it echoes the instruction first
    assert sc.correct_of("complete").mean() >= 0.9
    assert sc.correct_of("token_sum").mean() <= 0.6
    assert sc.greedy_correct.mean() >= 0.75 and sc.greedy_valid.mean() >= 0.75


# --------------------------------------------------------------------------- false positives by simulation
def test_random_concepts_are_called_specific_at_most_about_five_percent_of_the_time(tiny_lm):
    """Null by construction: a "concept" is a random neuron set, exchangeable with its 20 random
    controls. Scoring a pool of random sets once, 100 draws of (concept, 20 controls) from it
    estimate how often the decision rule calls a null effect specific."""
    pairs = sample_pairs(decimal_pairs("equal", (13, 40)), 30, seed=5)  # equal lengths: no trivial winner
    items = format_items(pairs, "chat")
    prep = prepare(tiny_lm, items)
    rng = np.random.default_rng(0)
    sets = [[Intervention([(int(l), int(n), 1) for l in range(tiny_lm.n_layers)
                           for n in rng.choice(tiny_lm.n_neurons, 48, replace=False)], "replace", 0.0)]
            for _ in range(63)]
    pool = score_many(tiny_lm, prep, sets, greedy=False)  # the 63 sets share forward passes
    base = score(tiny_lm, prep, None, greedy=False)
    acc = [p.correct_of().mean() for p in pool]
    assert np.std(acc) > 0.01, "random sets must move the tiny model, or the simulation tests nothing"
    calls = []
    for seed in range(100):
        pick = np.random.default_rng(seed).choice(len(pool), 21, replace=False)
        conds = [Condition("baseline", "baseline"), Condition("concept", "spec")] + \
            [Condition(f"c{i}", "control", of="concept") for i in range(20)]
        res = ExperimentResult(items, conds, [base] + [pool[i] for i in pick], {}, 0.0)
        calls.append(analyze(res, seed=seed)["conditions"][1]["verdict"]["complete"])
    rate = calls.count("specific") / len(calls)
    assert rate <= 0.09, calls  # the 95% upper binomial bound for 100 draws at 5%
    assert calls.count("not specific") + calls.count("no change") >= 90


def test_classify_needs_every_condition():
    row = {"complete": {"vs_baseline": {"diff": 0.2, "p": 0.001, "p_holm": 0.004},
                        "vs_controls": {"beyond_all": True, "p_t": 0.001, "p_t_holm": 0.004, "null_mean": 0.0}}}
    assert classify(row)["complete"] == "specific"
    row["complete"]["vs_controls"]["beyond_all"] = False
    assert classify(row)["complete"] == "not specific"
    row["complete"]["vs_baseline"]["p_holm"] = 0.2
    assert classify(row)["complete"] == "no change"
    row = {"greedy": {"valid_rate": 0.2, "vs_baseline": {"diff": 0.5, "p": 1e-9}}}
    assert classify(row)["greedy"] == "not measured" and classify(row)["complete"] == "not measured"


# --------------------------------------------------------------------------- many conditions in one forward
def _mixed_conditions(n_layers: int, n_neurons: int):
    """Steering conditions of every kind the stacked path must reproduce: none, suppress with
    +generated, replace with a value, scale on the whole prompt, explicit positions, and one with
    two token ranges on one layer (not densifiable: applied block by block)."""
    rng = np.random.default_rng(3)

    def neurons(layers, k):
        return [(int(l), int(n), int(p)) for l in layers for n, p in zip(rng.choice(n_neurons, k, replace=False),
                                                                         rng.choice([1, -1], k))]

    return [
        None,
        [Intervention(neurons(range(0, n_layers, 2), 40), "replace", 0.0, tokens=TokenRange("last_user", generated=True))],
        [Intervention(neurons(range(n_layers), 20), "replace", 0.8)],
        [Intervention(neurons((1, n_layers - 1), 60), "scale", factor=2.5, tokens=TokenRange("prompt"))],
        [Intervention(neurons((2,), 30), "scale", factor=0.0, tokens=TokenRange("positions", (1, 2, 3)))],
        [Intervention(neurons((2, 3), 30), "replace", 0.0, tokens=TokenRange("positions", (0, 1))),
         Intervention(neurons((2,), 30), "scale", factor=3.0, tokens=TokenRange("last_user", generated=True))],
    ]


def test_stacked_interventions_equal_each_set_alone(lm):
    """StackedInterventions.apply on a stacked batch == each compiled set on its own block, bit for bit."""
    from engine.chat import render_chat
    from engine.steering import StackedInterventions, compile_interventions

    r = render_chat(lm.tokenizer, [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}])
    q = {1: np.full((lm.n_layers, lm.n_neurons), 3.0), -1: np.full((lm.n_layers, lm.n_neurons), -2.0)}
    sets = [compile_interventions(c or [], r, lm.n_layers, lm.n_neurons, q) for c in _mixed_conditions(lm.n_layers, lm.n_neurons)]
    stacked = StackedInterventions(sets)
    assert stacked._dense[2] is None and stacked._dense[0] is not None  # both paths are exercised
    gen = torch.Generator().manual_seed(0)
    for offset, t in ((0, len(r)), (5, 4), (len(r), 3)):  # the prompt, a slice of it, generated tokens
        x = torch.randn(len(sets) * 3, t, lm.n_neurons, generator=gen)
        for layer in range(lm.n_layers):
            got = stacked.apply(layer, x, offset) if stacked.touches(layer) else x
            want = torch.cat([s.apply(layer, x[3 * i:3 * i + 3], offset) for i, s in enumerate(sets)])
            assert torch.equal(got, want), (layer, offset)
    changed = stacked.apply(0, x := torch.randn(len(sets), len(r), lm.n_neurons, generator=gen), 0)
    assert torch.equal(changed[0], x[0]) and not torch.equal(changed[1], x[1])  # the baseline block is untouched


def test_score_many_equals_scoring_each_condition_alone(lm):
    """The shared-forward scorer gives each condition what scoring it alone gives (scores and greedy
    replies), across groups of different lengths and condition chunks of several sizes."""
    items = format_items(sample_pairs(decimal_pairs("shorter", (2, 30)), 5, seed=2), "system")
    prep = prepare(lm, items)
    assert len(prep.groups) > 1 and prep.common > 0
    q = {1: np.full((lm.n_layers, lm.n_neurons), 3.0), -1: np.full((lm.n_layers, lm.n_neurons), -2.0)}
    conds = _mixed_conditions(lm.n_layers, lm.n_neurons)
    alone = [score(lm, prep, c, q, greedy=True, max_new_tokens=6, batch_size=4) for c in conds]
    for batch in (4, 9):  # chunks of 1–4 conditions per forward
        many = score_many(lm, prep, conds, q, greedy=True, max_new_tokens=6, batch_size=batch)
        for a, m in zip(alone, many):
            for metric in ("complete", "first_diff", "token_sum"):
                np.testing.assert_allclose(getattr(m, metric), getattr(a, metric), atol=2e-3)
            assert m.greedy == a.greedy
    moved = [np.abs(a.complete - alone[0].complete).max() for a in alone[1:]]
    assert min(moved) > 1e-3  # every condition really steers (or the comparison proves little)
