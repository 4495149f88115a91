"""The concept linter: clustering against scipy/scikit-learn, c-TF-IDF, LLM labels via a fake server, spurious flag."""

from __future__ import annotations

import http.server
import json

import numpy as np
import pytest
import torch

from engine.errors import MonitorError
from concepts.lint import LLMLabeler, parse_llm_label
from engine.linter import (
    SPURIOUS_RULE, NeuronHit, RelevanceCalibration, cluster_embeddings, conversation_text, ctfidf_keywords,
    important_neurons, lint,
)
from tests.fake_openai import chat_completion, send_json, serve

QUESTION = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]


def _planted(seed=0, groups=4, per=6, d=32, noise=0.25, singles=5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, d))
    x = [c + noise * rng.normal(size=(per, d)) for c in centres] + [rng.normal(size=(singles, d))]
    return np.concatenate(x)


@pytest.mark.parametrize("seed, threshold, min_size", [(0, 0.6, 3), (1, 0.6, 3), (2, 0.3, 2), (3, 0.9, 4)])
def test_clusters_equal_scipy_and_sklearn(seed, threshold, min_size):
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.cluster import AgglomerativeClustering

    x = _planted(seed)
    got = {tuple(g.tolist()) for g in cluster_embeddings(x, threshold, min_size)}
    labels = fcluster(linkage(x, method="average", metric="cosine"), t=threshold, criterion="distance")
    want = {tuple(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}
    assert got == {g for g in want if len(g) >= min_size}
    sk = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                 distance_threshold=threshold).fit(x).labels_
    want_sk = {tuple(np.flatnonzero(sk == c).tolist()) for c in np.unique(sk)}
    assert got == {g for g in want_sk if len(g) >= min_size}
    if seed < 2:  # the planted groups of 6 come back whole at the default cut
        assert {tuple(range(6 * i, 6 * i + 6)) for i in range(4)} <= got


def test_cluster_edge_cases():
    assert cluster_embeddings(np.ones((2, 4)), 0.6, 3) == []
    with pytest.raises(MonitorError, match="threshold"):
        cluster_embeddings(np.ones((5, 4)), 0.0)


def test_ctfidf_matches_formula_and_picks_topics():
    docs = [["' by', ' In' in Bible verses and prose", "' the' in Bible verses (kings)", "Bible verses (lord)"],
            ["'1', '2' in calendar dates", "' Sep' in calendar dates (month)", "dates and months"],
            ["Python source code", "code and chat"]]
    kws = ctfidf_keywords(docs, top_n=3)
    assert kws[0][0] == "bible verses" and "dates" in kws[1] and "python source" in " ".join(kws[2])
    assert "kings bible" not in kws[0]  # no bigram across two descriptions
    assert not any(w in " ".join(k) for k in kws for w in ("' by'", "by"))  # quoted tokens and stop words removed
    # The formula, computed by hand for unigrams only.
    from sklearn.feature_extraction.text import CountVectorizer

    import re

    flat = [" . ".join(re.sub(r"'[^']*'", " ", x) for x in d) for d in docs]
    vec = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")
    tf = vec.fit_transform(flat).toarray().astype(float)
    w = tf / tf.sum(1, keepdims=True) * np.log(1 + tf.sum(1).mean() / tf.sum(0))
    terms = list(vec.get_feature_names_out())
    top = [terms[j] for j in np.argsort(-w[1], kind="stable")[:2]]
    assert top[0] == "dates" and kws[1][0] == "dates"  # same winner as the hand computation


def test_parse_llm_label():
    assert parse_llm_label('Sure! {"label": "Bible verse references", "coherence": 4}') == ("Bible verse references", 4)
    assert parse_llm_label('{"label": "a b c d e f g", "coherence": 9}') == ("a b c d e", 5)
    assert parse_llm_label("Calendar dates") == ("Calendar dates", None)


class _FakeLLM(http.server.BaseHTTPRequestHandler):
    requests: list = []
    status = 200

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if type(self).status != 200:
            self.send_response(type(self).status)
            self.end_headers()
            return
        listed = body["messages"][-1]["content"]
        label = "Bible verse references" if "Bible" in listed else "Calendar dates"
        send_json(self, chat_completion(json.dumps({"label": label, "coherence": 4})))

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_llm():
    _FakeLLM.requests = []
    _FakeLLM.status = 200
    with serve(_FakeLLM) as url:
        yield url


def _two_topic_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=32), rng.normal(size=32)
    emb = np.stack([a + 0.1 * rng.normal(size=32) for _ in range(4)] + [b + 0.1 * rng.normal(size=32) for _ in range(3)])
    summaries = ["' the' in Bible verses (kings)", "' of' in Bible verses", "'Genesis' in Bible verses",
                 "' lord' in Bible verses", "'1' in calendar dates", "' Sep' in calendar dates", "dates (month)"]
    hits = [NeuronHit(0, i, 1, w, {i: w}) for i, w in enumerate([1, 1, 1, 1, 5, 5, 5.0])]
    return hits, emb, summaries


def test_llm_labels_through_fake_server(fake_llm):
    labeler = LLMLabeler.from_env({"MONITOR_LLM_BASE_URL": fake_llm, "MONITOR_LLM_MODEL": "tiny-labeler",
                                   "MONITOR_LLM_API_KEY": "sk-test"})
    hits, emb, summaries = _two_topic_inputs()
    report = lint(hits, emb, summaries, labeler=labeler)
    assert [c.label for c in report.clusters] == ["Calendar dates", "Bible verse references"]  # ranked by weight
    assert all(c.label_source == "llm" and c.coherence == 4 for c in report.clusters)
    assert len(_FakeLLM.requests) == 2
    req = _FakeLLM.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "tiny-labeler" and "2 to 5 words" in req["body"]["messages"][-1]["content"]
    _FakeLLM.status = 500
    report = lint(hits, emb, summaries, labeler=labeler)  # a failing endpoint falls back to offline labels
    assert all(c.label_source == "c-tf-idf" for c in report.clusters)
    assert any("HTTP 500" in w for w in report.warnings)


def test_llm_config_is_explicit():
    assert LLMLabeler.from_env({}) is None
    with pytest.raises(MonitorError, match="both"):
        LLMLabeler.from_env({"MONITOR_LLM_BASE_URL": "http://127.0.0.1:9"})
    with pytest.raises(MonitorError, match="unreachable"):
        LLMLabeler("http://127.0.0.1:9/v1", "m", timeout=2).label(["x"])


def test_offline_report_ranks_and_maps_clusters():
    hits, emb, summaries = _two_topic_inputs()
    hits.append(NeuronHit(3, 3, -1, 100.0, {0: 100.0}))  # undescribed: zero embedding, left out with a warning
    emb = np.vstack([emb, np.zeros(32)])
    summaries.append("")
    report = lint(hits, emb, summaries)
    assert report.n_hits == 8 and report.n_described == 7 and report.warnings
    dates, bible = report.clusters
    assert dates.weight == 15 and bible.weight == 4 and dates.keywords[0] == "dates"
    assert dates.neurons == [(0, 4, 1), (0, 5, 1), (0, 6, 1)] and set(dates.tokens) == {4, 5, 6}
    assert dates.central in summaries and 0 < bible.cohesion <= 1
    spec = dates.to_spec()
    assert spec.mode == "suppress" and spec.neurons == tuple(dates.neurons) and spec.concept == dates.label
    json.dumps(report.to_dict())
    assert report.rule == "" and dates.spurious is None


def test_important_neurons_by_attribution_and_activation():
    from engine.trace import Trace

    acts = torch.zeros(2, 4, 3)
    acts[0, 1, 2], acts[1, 2, 0], acts[1, 3, 0], acts[0, 0, 1] = 5.0, -4.0, 2.0, 999.0  # token 0: the sink
    attr = torch.zeros(2, 4, 3)
    attr[0, 1, 2], attr[1, 2, 0], attr[1, 3, 0], attr[0, 0, 1] = 0.5, -0.3, 0.2, 9.0
    trace = Trace(rendered=None, activations=acts, top_next=[], next_token_prob=[], attributions=attr)
    hits = important_neurons(trace, "attribution", k=10)
    assert [(h.key, round(h.weight, 6), h.tokens) for h in hits] == [
        ((0, 2, 1), 0.5, {1: 0.5}), ((1, 0, -1), 0.3, {2: pytest.approx(0.3)}), ((1, 0, 1), 0.2, {3: pytest.approx(0.2)})]
    hi, lo = np.full((2, 3), 2.0), np.full((2, 3), -2.0)
    hits = important_neurons(trace, "activation", k=10, scale=(hi, lo))
    assert [(h.key, h.weight, h.tokens) for h in hits] == [((0, 2, 1), 2.5, {1: 2.5}), ((1, 0, -1), 2.0, {2: 2.0}),
                                                         ((1, 0, 1), 1.0, {3: 1.0})]
    with pytest.raises(MonitorError, match="quantiles"):
        important_neurons(trace, "activation")
    with pytest.raises(MonitorError, match="no attribution"):
        important_neurons(Trace(rendered=None, activations=acts, top_next=[], next_token_prob=[]), "attribution")


# --------------------------------------------------------------------------- the spurious flag (real embedder)
@pytest.fixture(scope="module")
def db(embedded_db):
    from cache.db import open_database

    with open_database(embedded_db) as handle:
        yield handle


def test_spurious_flag_on_planted_clusters(db):
    from concepts.lint import random_description_vectors
    from cache.embedder import embed

    conv = embed(conversation_text(QUESTION))[0]
    calibration = RelevanceCalibration.from_vectors(conv, random_description_vectors(db, 2000, seed=0))
    related = ["'9', '.', '8' in decimal numbers and arithmetic", "'.', '1', '5' in decimal numbers (comparison, larger)",
               "digits after the decimal point in numbers"]
    bible = ["' the', ' of' in Bible verses (kings, lord)", "'Genesis', ' chapter' in Bible verses",
             "' thou', ' hath' in Bible verses (israel)"]
    code = ["' def', ' self' in Python source code", "' import', ' os' in Python source code",
            "' return', ' None' in Python source code"]
    texts = related + bible + code
    emb = embed(texts)
    hits = [NeuronHit(8, i, 1, 1.0 + (i // 3), {i: 1.0}) for i in range(len(texts))]
    report = lint(hits, emb, texts, calibration=calibration)
    by_first = {c.members[0].neuron // 3: c for c in report.clusters}
    assert set(by_first) == {0, 1, 2}  # the three planted groups come back as clusters
    assert by_first[0].spurious is False and by_first[1].spurious is True and by_first[2].spurious is True
    # the related cluster is in the top 5% of random descriptions; the unrelated ones (below the 90th
    # percentile: spurious) sit well below it (how far depends on the corpus the database came from)
    assert by_first[0].relevance_percentile > 95
    assert max(by_first[1].relevance_percentile, by_first[2].relevance_percentile) < by_first[0].relevance_percentile - 10
    assert "Likely spurious" in by_first[1].explanation and "Related" in by_first[0].explanation
    rule = report.rule
    assert "2000 randomly drawn" in rule and "90th percentile" in rule and f"{calibration.threshold:.3f}" in rule
    assert SPURIOUS_RULE.split(".")[0] in rule


def test_lint_trace_end_to_end(lm, db):
    from concepts.lint import lint_trace
    from engine.trace import run_trace

    trace = run_trace(lm, QUESTION, target_index=-1)
    report = lint_trace(db, trace, labeler=None)
    assert report.n_hits > 0 and report.n_described > 0 and report.calibration is not None
    weights = [c.weight for c in report.clusters]
    assert weights == sorted(weights, reverse=True)
    for c in report.clusters:
        assert len(c.members) >= 3 and c.spurious in (True, False) and c.label
        rows = c.token_rows(trace.tokens)
        assert rows and all(0 <= r["index"] < len(trace.tokens) for r in rows)
    act = lint_trace(db, trace, mode="activation", labeler=None, threshold=0.5)
    assert act.mode == "activation" and act.n_hits > 0
    json.dumps(report.to_dict())


def test_linter_and_chat_table_select_the_same_neurons(lm, db):
    """One activation view: the linter's activation mode and the chat table agree on which neurons are ≥ 1."""
    from concepts.resolve import activation_view
    from dashboard.ranking import activation_rows
    from engine.trace import run_trace

    trace = run_trace(lm, QUESTION)
    view = activation_view(db)
    # A neuron whose quantile is ~0 would reach |n| in the thousands without the floor: make sure some are.
    q_hi = db.quantile_table(1 - 1e-5).copy()
    q_lo = db.quantile_table(1e-5).copy()
    q_hi[3, :40] = 1e-9
    q_lo[3, 40:80] = -1e-9
    for scale in (view, (q_hi, q_lo)):
        v = scale if not isinstance(scale, tuple) else type(view).from_quantiles(*scale)
        for threshold in (1.0, 0.5):
            rows, total = activation_rows(trace, v, threshold, skip_sink=True, limit=10**6)
            hits = important_neurons(trace, "activation", k=10**6, scale=scale, min_normalised=threshold)
            assert total == len(rows) > 0
            assert {(h.layer, h.neuron) for h in hits} == set(zip(rows["layer"], rows["neuron"]))
            weight = {h.key: h.weight for h in hits}
            for r in rows.itertuples():  # the table's value is the linter's weight for that polarity
                assert weight[(r.layer, r.neuron, r.polarity)] == pytest.approx(abs(r.value), rel=1e-6)


# --------------------------------------------------------------------------- causal check
def _report(clusters_members):
    """A LintReport of clusters built directly from (layer, neuron, polarity, tokens) members."""
    from engine.linter import Cluster, LintReport

    clusters = [Cluster(id=i, members=[NeuronHit(l, n, p, 1.0, {t: 1.0 for t in toks}) for l, n, p, toks in ms],
                        summaries=[""] * len(ms), weight=float(len(ms)), label=f"c{i}", keywords=[], central="",
                        cohesion=1.0) for i, ms in enumerate(clusters_members)]
    return LintReport("attribution", clusters, 0, 0, 0.6, 3)


def test_causal_check_planted_cluster_beats_null_and_random_clusters_do_not(tiny_lm):
    """On the tiny Llama: the 4 neurons with the largest measured effect on the contrast (planted as a
    cluster) lie beyond all 20 matched random sets; random clusters do so about 5% of the time
    (exchangeable draws: 1/21 each), checked over 40 seeds."""
    from engine.effects import suppression_effects
    from engine.linter import causal_check
    from engine.trace import run_trace

    trace = run_trace(tiny_lm, QUESTION, target_index=-3, distractor="8")
    t = trace.target_index
    toks = tuple(range(t - 4, t))
    # known drivers: measure every neuron of the last 4 tokens, keep the 4 biggest (one per layer at most 2)
    cands = [(l, n) for l in range(tiny_lm.n_layers) for n in range(tiny_lm.n_neurons)]
    eff = suppression_effects(tiny_lm, trace, [[(l, tk, n) for tk in toks] for l, n in cands], batch_size=96)
    top = [cands[i] for i in np.argsort(-np.abs(eff))[:4]]
    pol = lambda l, n: 1 if float(trace.activations[l, t - 1, n]) >= 0 else -1  # noqa: E731
    planted = [(l, n, pol(l, n), toks) for l, n in top]
    rng = np.random.default_rng(123)
    randoms = []
    for _ in range(40):
        layers = rng.integers(0, tiny_lm.n_layers, size=4)
        neurons = rng.choice(tiny_lm.n_neurons, size=4, replace=False)
        randoms.append([(int(l), int(n), 1, toks) for l, n in zip(layers, neurons)])
    report = causal_check(tiny_lm, trace, _report([planted] + randoms), n_null=20, seed=7, batch_size=128)
    by_label = {c.label: c for c in report.clusters}
    p = by_label["c0"]
    assert p.moves and p.null["percentile"] > 95 and p.null["n"] == 20
    assert p.effect == pytest.approx(float(suppression_effects(tiny_lm, trace, [[(l, tk, n) for l, n, _, ts in planted
                                                                                   for tk in ts]])[0]), abs=1e-5)
    false_alarms = sum(by_label[f"c{i}"].moves for i in range(1, 41))
    assert false_alarms <= 5, false_alarms  # ≈ 5% of 40 = 2 expected
    assert report.clusters[0].label == "c0"  # ranked by |measured effect|
    assert abs(report.clusters[0].effect) >= abs(report.clusters[-1].effect)
    assert "random matched sets" in p.effect_text and report.causal["n_null"] == 20


def test_causal_flag_combines_relevance_and_null(tiny_lm):
    """spurious = unrelated to the conversation AND moves the answer beyond the null."""
    from engine.linter import causal_check
    from engine.trace import run_trace

    trace = run_trace(tiny_lm, QUESTION, target_index=-3, distractor="8")
    report = _report([[(1, 5, 1, (trace.target_index - 1,)), (2, 6, 1, (trace.target_index - 1,))]] * 2)
    report.clusters[0].unrelated = report.clusters[0].spurious = True
    report.clusters[1].unrelated = report.clusters[1].spurious = False
    causal_check(tiny_lm, trace, report, n_null=20)
    for c in report.clusters:
        assert c.spurious == (c.unrelated and c.moves)
    with pytest.raises(MonitorError, match="at least 20"):
        causal_check(tiny_lm, trace, report, n_null=5)
