"""The offline explainer and its scorers: the sink token, planted features, the AUC, NULL scores.

A synthetic corpus is tokenised with the embedded model's tokenizer and given synthetic
activations with known causes, then run through the real collector, exemplar view,
contrastive explainer, token-match simulator and embedding scorer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from precompute.collect import Collector, extremes_needed
from precompute.corpus import Corpus, corpus_hash
from precompute.describe import CorpusStats, describe, describe_v1, ContextStats, evidence
from precompute.embedding_score import (SPAN_LEN, all_span_rows, auc_rows, peak_span_rows, prefer_bare, score_keys,
                                       score_span_keys, span_starts, span_texts)
from precompute.exemplar_view import ExemplarView
from precompute.simulate import Simulator, parse, pearson, pearson_rows

T = 24
WORDS = ("river stone garden window paper music table winter morning letter market bridge forest "
         "doctor teacher kitchen engine village summer island").split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine.loader import ensure_embedded_model

    return AutoTokenizer.from_pretrained(str(ensure_embedded_model(progress=False)))


def make_corpus(tokenizer, n: int = 240, seed: int = 0) -> Corpus:
    """n windows of T tokens: plain word salad; every 10th has ' apple' in it, every 5th 'the Lord',
    every 4th 'Lord' after another word."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = list(rng.choice(WORDS, 40))
        if i % 10 == 0:
            for j in rng.choice(np.arange(3, 30), 3, replace=False):
                words[j] = "apple"
        if i % 5 == 0:
            j = int(rng.integers(3, 28))
            words[j:j + 2] = ["the", "Lord"]
        if i % 4 == 1:
            words[int(rng.integers(3, 28))] = "Lord"
        texts.append(" " + " ".join(words))
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:T] for t in texts]
    ids = np.asarray(rows, dtype=np.int32)
    vocab = {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}
    tokens = [[vocab[int(t)] for t in row] for row in ids]
    return Corpus(ids, ["salad"] * n, tokenizer.batch_decode(ids.tolist()), tokens, [], corpus_hash(ids))


def id_of(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def planted_acts(corpus: Corpus, tokenizer, sink: float = 0.0, seed: int = 1) -> np.ndarray:
    """[n, F=3, T]: f0 fires on ' apple'; f1 on ' Lord' after ' the'; f2 is noise. Position 0 gets ``sink``."""
    rng = np.random.default_rng(seed)
    ids = corpus.token_ids
    apple, lord, the = (id_of(tokenizer, w) for w in (" apple", " Lord", " the"))
    acts = rng.normal(0, 0.05, (len(ids), 3, T)).astype(np.float32)
    acts[:, 0] += 4.0 * (ids == apple)
    after = np.zeros(ids.shape, bool)
    after[:, 1:] = (ids[:, 1:] == lord) & (ids[:, :-1] == the)
    acts[:, 1] += 5.0 * after
    acts[:, :, 0] = sink
    return acts


def collect(acts: np.ndarray, k: int = 16, n_random: int = 24) -> Collector:
    n = len(acts)
    rand = np.random.default_rng(2).choice(n, n_random, replace=False).tolist()
    col = Collector(acts.shape[1], acts.shape[2], k, extremes_needed(n * (acts.shape[2] - 1)), rand)
    for a in range(0, n, 16):
        col.update(torch.arange(a, min(a + 16, n)), torch.from_numpy(acts[a:a + 16]))
    col.flush()
    return col


@pytest.fixture(scope="module")
def planted(tokenizer):
    corpus = make_corpus(tokenizer)
    col = collect(planted_acts(corpus, tokenizer, sink=0.0))
    view = ExemplarView(col.state, col.k, corpus, n_neurons=3, skip_prefix=1)
    stats = CorpusStats(corpus, 1)
    return corpus, view, stats, Simulator(stats.strings)


def test_sink_token_never_reaches_the_explainer_or_the_scorer(tokenizer):
    """A neuron whose token-0 value dwarfs everything: the view drops position 0, so the
    explainer names the real token and the scorer correlates on real positions only.
    (Before the fix the view handed position 0 on, and the description named whatever
    token opened the window.)"""
    corpus = make_corpus(tokenizer)
    acts = planted_acts(corpus, tokenizer, sink=3000.0)
    col = collect(acts)
    view = ExemplarView(col.state, col.k, corpus, n_neurons=3, skip_prefix=1)
    train = view.train(0, 0, 1, with_random=True)
    assert train.acts.shape[1] == T - 1 and train.token_ids.shape[1] == T - 1
    assert float(np.abs(train.acts).max()) < 100  # 3,000 lived only on position 0
    np.testing.assert_array_equal(train.token_ids, corpus.token_ids[train.seq_ids][:, 1:])
    stats = CorpusStats(corpus, 1)
    sim = Simulator(stats.strings)
    text, _, _ = describe(1, train, stats, sim, [], [])
    assert "' apple'" in text, text
    first = {corpus.tokens[i][0] for i in train.seq_ids[: train.n_top]}
    assert not any(f"Fires on {('' + f).strip()!r}" in text for f in first)
    held = view.heldout(0, 0, 1)
    assert held.acts.shape[1] == T - 1 and float(np.abs(held.acts).max()) < 100
    score = sim.score(text, 1, held)
    assert score is not None and score > 0.9
    # the old explainer on the same (sink-free) view also finds it: the fix is in the view
    old = describe_v1(1, train.tokens[: train.n_top], train.acts[: train.n_top], train.sources[: train.n_top],
                      [], [], ContextStats(corpus.texts))[0]
    assert "' apple'" in old


def test_contrastive_explainer_recovers_planted_features(planted):
    corpus, view, stats, sim = planted
    apple, _, score = describe(1, view.train(0, 0, 1, with_random=True), stats, sim, [], [])
    assert apple.startswith("Fires on ' apple'"), apple
    assert score is not None and score > 0.9
    lord, summary, _ = describe(1, view.train(0, 1, 1, with_random=True), stats, sim, [], [])
    assert "' Lord' after ' the'" in lord, lord  # the previous token, not just the token
    assert summary.startswith("' Lord' after ' the'")
    held = view.heldout(0, 1, 1)
    with_after = sim.score(lord, 1, held)
    without = sim.score(lord.replace(" after ' the'", ""), 1, held)
    assert with_after > 0.9 and with_after >= without
    # the noise neuron is not forced into a confident token list
    noise, _, _ = describe(1, view.train(0, 2, 1, with_random=True), stats, sim, [], [])
    assert "(diffuse)" in noise or "/15" not in noise


def test_log_odds_ranks_the_distinctive_token_above_a_frequent_one(planted, tokenizer):
    """' apple' and ' river' both sit at every hot position of some exemplars, but ' river' is
    everywhere in the corpus: the contrastive ranking puts ' apple' first."""
    corpus, view, stats, _ = planted
    train = view.train(0, 0, 1)
    acts = train.acts.copy()
    river = id_of(tokenizer, " river")
    acts[train.token_ids == river] = 4.0  # the neuron also fires on a very common token
    train.acts = acts
    ev = evidence(1, train, stats)
    assert ev.tokens[0][0] == id_of(tokenizer, " apple")
    assert river in [t for t, _, _ in ev.tokens]


def chosen_summary(planted, feature: int) -> str:
    """The planted feature's summary in the form the build keeps: full or bare, whichever has the
    higher span AUC on the train windows (:func:`precompute.embedding_score.prefer_bare`)."""
    from cache.embedder import embed
    from cache.search_explain import bare_summary

    corpus, view, stats, sim = planted
    _, full, _ = describe(1, view.train(0, feature, 1, with_random=True), stats, sim, [], [])
    bare = bare_summary(full)
    assert bare and full.startswith(bare) and len(bare) < len(full)
    starts = span_starts(corpus.seq_len, 1)
    spans = embed(span_texts(corpus.tokens, starts))
    (pick,) = prefer_bare(embed([full]), embed([bare]), [view.train(0, feature, 1)], [1], view.random_train_ids,
                          spans, starts, 1)
    return bare if pick else full


def test_summary_form_is_chosen_on_train_windows(planted):
    """On word salad the context of ' apple' is noise: the full summary (sources, context words,
    snippet) scores lower on the train spans than the bare token, so the bare form is kept."""
    from cache.embedder import embed

    corpus, view, stats, sim = planted
    chosen = chosen_summary(planted, 0)
    assert chosen == "' apple'"
    starts = span_starts(corpus.seq_len, 1)
    spans = embed(span_texts(corpus.tokens, starts))
    _, full, _ = describe(1, view.train(0, 0, 1, with_random=True), stats, sim, [], [])
    train = [view.train(0, 0, 1)]
    by_hand = [score_span_keys(embed([x]), train, [1], view.random_train_ids, spans, starts, 1)[0]
               for x in (full, chosen)]
    assert by_hand[1] > by_hand[0]


def test_embedding_scorer_ranks_planted_windows_above_random(planted):
    from cache.embedder import embed

    corpus, view, stats, sim = planted
    windows = embed(corpus.texts)
    summary = chosen_summary(planted, 0)
    d = embed([summary])
    held = view.heldout(0, 0, 1)
    auc = score_keys(d, [held.seq_ids[: held.n_top]], view.random_test_ids, windows)[0]
    assert auc >= 0.9, (summary, auc)
    # the same through sklearn on the same similarities
    s = windows @ d[0]
    y = [1] * held.n_top + [0] * len(view.random_test_ids)
    ref = roc_auc_score(y, np.concatenate([s[held.seq_ids[: held.n_top]], s[view.random_test_ids]]))
    assert auc == pytest.approx(ref, abs=1e-9)


def test_span_starts_cover_every_scored_position_and_the_peak_span_holds_the_peak():
    for seq_len, skip in ((64, 1), (24, 1), (95, 1), (10, 1), (64, 0)):
        starts = span_starts(seq_len, skip)
        assert starts[0] == skip and max(a + SPAN_LEN for a in starts) >= seq_len
        for p in range(skip, seq_len):
            (row,) = peak_span_rows([3], [p], starts)
            seq, j = divmod(row, len(starts))
            a = starts[j]
            assert seq == 3 and a <= p < a + SPAN_LEN  # the chosen span holds the peak
            if seq_len >= SPAN_LEN + 8:  # and, away from the window's ends, context on both sides
                assert (p - a >= 4 or a == skip) and (a + SPAN_LEN - 1 - p >= 4 or a + SPAN_LEN >= seq_len)
    assert all_span_rows([0, 2], [1, 9, 17]) == [0, 1, 2, 6, 7, 8]


def test_span_scorer_ranks_planted_peaks_above_random_spans_and_agrees_with_sklearn(planted):
    """The span scorer on the planted ' apple' neuron, against a hand computation: each positive is
    the span (embedded on its own) with the centre nearest the held-out peak, found by brute force."""
    from cache.embedder import embed

    corpus, view, stats, sim = planted
    starts = span_starts(corpus.seq_len, 1)
    spans = embed(span_texts(corpus.tokens, starts))
    d = embed([chosen_summary(planted, 0)])
    held = view.heldout(0, 0, 1)
    auc = score_span_keys(d, [held], [1], view.random_test_ids, spans, starts, 1)[0]
    assert auc >= 0.9, (summary, auc)
    pos = []
    for i in range(held.n_top):
        peak = int(np.argmax(held.acts[i])) + 1  # Windows drop the sink position
        a = min(starts, key=lambda s: (abs(s + (SPAN_LEN - 1) / 2 - peak), s))
        assert a <= peak < a + SPAN_LEN
        text = "".join(corpus.tokens[held.seq_ids[i]][a : a + SPAN_LEN])
        pos.append(float(embed([text])[0] @ d[0]))
    neg = [float(embed(["".join(corpus.tokens[s][a : a + SPAN_LEN])])[0] @ d[0])
           for s in view.random_test_ids for a in starts]
    ref = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert auc == pytest.approx(ref, abs=0.02)  # texts embedded one by one vs batched: bf16-free, fp32 noise only


def test_auc_rows_agree_with_sklearn_including_ties_and_masks():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 6, (40, 5)).astype(float)  # small integers: many ties
    neg = rng.integers(0, 6, (40, 9)).astype(float)
    pos_ok = rng.random((40, 5)) > 0.2
    pos_ok[:, 0] = True
    got = auc_rows(pos, neg, pos_ok, None)
    for i in range(40):
        p = pos[i][pos_ok[i]]
        ref = roc_auc_score([1] * len(p) + [0] * neg.shape[1], np.concatenate([p, neg[i]]))
        assert got[i] == pytest.approx(ref, abs=1e-12)
    assert np.isnan(auc_rows(pos[:1], neg[:1], np.zeros((1, 5), bool), None)[0])  # no positive: undefined


def test_no_prediction_is_none_not_zero(planted):
    corpus, view, stats, sim = planted
    held = view.heldout(0, 0, 1)
    assert sim.score("Fires on no single token (diffuse); e.g. “x”.", 1, held) is None
    assert sim.score("Fires on 'zzzz-not-a-token'.", 1, held) is None
    assert pearson(np.ones(10), np.arange(10.0)) is None  # constant truth: undefined too
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 50))
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    rows = pearson_rows(a, np.stack([b, -b, np.zeros(50)]))
    assert rows[0] == pytest.approx(-rows[1]) and rows[2] is None


def test_parser_reads_clauses_not_source_labels():
    old = "Fires on ':', ' 3' in Bible verses (book chapter:verse references); context: lord, israel; promotes ' Lord'."
    p = parse(old)
    assert [i[0] for i in p.items] == [":", " 3"] and p.context == {"lord", "israel"}
    new = ("Fires on ' was' after 'When' (9/15 top windows); context: said; mostly in Bible verses (11/15); "
           "at the window start (9/15); e.g. “When[ was] the”. Output: promotes ' a'; suppresses ' b'.")
    p = parse(new)
    assert p.items == [(" was", 1.0, "When")] and p.context == {"said"} and p.window_start
    assert "bible" not in p.context and "verses" not in p.context
    p = parse("Goes most negative on no single token (diffuse); also 'x', 'y'; e.g. “'z' here”.")
    assert p.items == [("x", 0.5, None), ("y", 0.5, None)]


def test_logit_lens_ids_match_a_hand_computation_in_any_chunking(tiny_lm):
    """The output side (``OutputTokens.ids``): per neuron, the tokens its down-projection column
    raises (lowers) most through the final norm's weight and the unembedding, computed here in
    float64 by argsort, equal the chunked top-k for any chunk size; ``layer`` decodes exactly those."""
    from precompute.describe import OutputTokens, decode_rows

    outs = OutputTokens(tiny_lm, n=5)
    model = tiny_lm.model
    w_u = model.get_output_embeddings().weight.double() * model.model.norm.weight.double()[None, :]
    for layer in range(tiny_lm.n_layers):
        logits = w_u @ tiny_lm.layers[layer].mlp.down_proj.weight.double()  # [vocab, neurons]
        want_top = np.argsort(-logits.numpy(), axis=0, kind="stable")[:5].T
        want_bottom = np.argsort(logits.numpy(), axis=0, kind="stable")[:5].T
        for chunk in (3, 512):
            top, bottom = outs.ids(layer, chunk=chunk)
            assert top.shape == (tiny_lm.n_neurons, 5) and top.dtype == np.int32
            assert (top == want_top).mean() > 0.99 and (bottom == want_bottom).mean() > 0.99  # float32 ties aside
    promotes, suppresses = outs.layer(0)
    top, bottom = outs.ids(0)
    assert promotes == decode_rows(tiny_lm.tokenizer, top) and suppresses[3][0] == tiny_lm.tokenizer.decode([int(bottom[3, 0])])
