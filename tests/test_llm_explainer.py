"""The optional LLM explainer/simulator (precompute.llm) against a local fake endpoint.

The fake is an ``http.server`` on 127.0.0.1 (a free port, in a thread) that implements
``POST /v1/chat/completions`` deterministically:

* explainer requests (the system prompt asks for a "Description:"): choice ``i`` quotes
  the ``i`` most frequent ``{{marked}}`` tokens it saw, choice 0 quotes a token that is
  never there ('zzzz'), each tagged "[fake candidate i]";
* simulator requests: 10 for every token named (in single quotes) in the description, 0
  otherwise, as a JSON list.

It records every request body, the most requests it had in flight at once, and can be
scripted to fail (status codes with headers, or a sleep past the client's timeout).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest

from engine.errors import MonitorError
from engine.llm_client import ChatClient, RequestCache, cache_key
from precompute.llm import CACHE_NAME, INACTIVE, ExplainJob, LLMConfig, LLMExplainer, ScoreJob, resolve_config
from precompute.llm_prompts import mark_exemplar, parse_explanation, parse_simulation
from tests.fake_openai import chat_completion, send_json, start, stop

MODEL = "fake-model"


class FakeLLM:
    def __init__(self, key: str | None = None):
        self.key = key
        self.bodies: list[dict] = []
        self.plan: list[tuple] = []  # consumed first: ("status", code, headers) or ("sleep", seconds)
        self.delay = 0.0
        self.honour_n = True
        self.summary = None  # a fixed Summary line, else a short one
        self.sim_reply = None  # a fixed simulator answer, else the token-match answer
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: dict, headers: dict | None = None):
                send_json(self, payload, code, headers)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                with fake.lock:
                    fake.bodies.append(body)
                    step = fake.plan.pop(0) if fake.plan else None
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay)
                    if step and step[0] == "status":
                        return self._send(step[1], {"error": {"message": "scripted failure"}}, step[2])
                    if step and step[0] == "sleep":
                        time.sleep(step[1])
                    contents = fake.answer(body)
                    self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                     **chat_completion(*contents)})
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.server, self.url = start(Handler, poll_interval=0.05)

    def answer(self, body: dict) -> list[str]:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if "Description:" in system:
            n = body.get("n", 1) if self.honour_n else 1
            first = body.get("seed", 0) if not self.honour_n or "seed" in body else 0
            ranked = [t for t, _ in Counter(m.strip() for m in re.findall(r"\{\{(.*?)\}\}", user)).most_common()]
            out = []
            for i in range(first, first + n):
                quoted = ["zzzz"] if i == 0 else ranked[:i] or ["zzzz"]
                shown = ", ".join(f"'{q}'" for q in quoted)
                out.append(f"Description: Fires on {shown} [fake candidate {i}].\n"
                           f"Summary: {self.summary or shown + ' tokens'}")
            return out
        if self.sim_reply is not None:
            return [self.sim_reply]
        desc = re.search(r"Neuron description: (.*)\n", user).group(1)
        tokens = json.loads(re.search(r"Tokens \(\d+\):\n(.*)\n", user).group(1))
        named = {q for q in re.findall(r"'([^']*)'", desc) if q}
        return [json.dumps([10 if t.strip() in named else 0 for t in tokens])]

    def explain_bodies(self) -> list[dict]:
        return [b for b in self.bodies if "Description:" in b["messages"][0]["content"]]

    def close(self):
        stop(self.server)


@pytest.fixture
def fake():
    server = FakeLLM()
    yield server
    server.close()


def config(server: FakeLLM, **kw) -> LLMConfig:
    opts = dict(api_key=server.key, backoff=0.001, max_backoff=0.01, timeout=5.0)
    opts.update(kw)
    return LLMConfig(base_url=server.url, model=MODEL, **opts)


# -- synthetic neurons ----------------------------------------------------------------------
SEQ = ["<s>", " the", " cat", " sat", " on", " a", " dog"]


def cat_job(key: str = "0:0:1") -> ExplainJob:
    """A neuron for ' cat' (10) that also fires on ' dog' (6) in half its train exemplars, never held out."""
    train_acts = np.zeros((4, len(SEQ)), dtype=np.float32)
    train_acts[:, 0] = 50.0  # the attention sink: must be ignored
    train_acts[:, 2] = 10.0
    train_acts[:2, 6] = 6.0
    train_acts[:, 1] = 1.0
    held_tokens = [SEQ, SEQ, ["<s>", " a", " dog", " on", " the", " mat", " ."], ["<s>", " one", " two", " three", " dog", " five", " six"]]
    held_acts = np.zeros((4, len(SEQ)), dtype=np.float32)
    held_acts[:2, 2] = 10.0
    held_acts[:, 0] = 40.0
    held_acts[2:, 1] = 0.5
    return ExplainJob(key, 1, [SEQ] * 4, train_acts, held_tokens, held_acts)


# -- prompt format and parsing ----------------------------------------------------------------
def test_marks_tokens_at_half_the_signed_extreme_and_skips_the_sink():
    acts = np.array([100.0, 1.0, 10.0, -8.0, 5.0, -3.0, 6.0])
    assert mark_exemplar(SEQ, acts, 1) == " the {{cat}} sat {{on}} a {{dog}}"
    assert mark_exemplar(SEQ, acts, -1) == " the cat {{sat}} on a dog"
    assert mark_exemplar(SEQ, np.abs(acts), -1) is None  # never negative: nothing to show
    assert mark_exemplar(["a", "\n", "b"], np.array([0.0, 2.0, 0.9]), 1, skip_prefix=0) == "a{{\\n}}b"


def test_prompt_shows_shuffled_train_exemplars_deterministically(fake):
    job = cat_job()
    job.train_tokens = [SEQ[:2] + [f" w{i}"] + SEQ[3:] for i in range(30)]
    job.train_acts = np.tile(job.train_acts[:1], (30, 1))
    with LLMExplainer(config(fake, max_exemplars=20)) as ex:
        msgs = ex.explain_prompt(job)
        user = msgs[-1]["content"]
        shown = re.findall(r"\{\{(w\d+)\}\}", user)
        assert len(shown) == 20 and set(shown) == {f"w{i}" for i in range(20)}  # the top 20 train exemplars
        assert shown != sorted(shown, key=lambda w: int(w[1:]))  # shuffled
        assert ex.explain_prompt(job) == msgs  # the same every run (so the cache hits)
        other = ex.explain_prompt(ExplainJob("0:1:1", 1, job.train_tokens, job.train_acts, [], job.train_acts[:0]))
        assert other != msgs
        assert "Description:" in msgs[0]["content"] and "Summary:" in msgs[0]["content"]
        assert "<s>" not in user
    assert fake.bodies == []  # building prompts sends nothing


def test_parse_explanation():
    assert parse_explanation("Description: Fires on 'cat'.\nSummary: cat tokens") == ("Fires on 'cat'.", "cat tokens")
    assert parse_explanation("**Description:** Fires on dates\n**Summary**: dates") == ("Fires on dates", "dates")
    long = " ".join(f"w{i}" for i in range(30))
    text, summary = parse_explanation(f"Fires on everything {long}")  # no labels: the first line, summary cut
    assert text.startswith("Fires on everything") and len(summary.split()) == 14
    assert parse_explanation("   \n") is None


def test_parse_simulation_is_lenient_but_checks_length():
    np.testing.assert_array_equal(parse_simulation("```json\n[0, 3, 10]\n```", 3), [0, 3, 10])
    np.testing.assert_array_equal(parse_simulation("Sure! [1.5, \"2\", 99, -4] done", 4), [1.5, 2, 10, 0])
    np.testing.assert_array_equal(parse_simulation('{"activations": [0, 7]}', 2), [0, 7])
    assert parse_simulation("[1, 2]", 3) is None
    assert parse_simulation("[1, 2, oops]", 3) is None
    assert parse_simulation("no list at all", 1) is None
    assert parse_simulation("[true, 1]", 2) is None


# -- explainer and simulator ------------------------------------------------------------------
def test_keeps_the_best_of_n_candidates_by_simulation_score(fake):
    with LLMExplainer(config(fake, n=3)) as ex:
        (res,) = ex.explain_many([cat_job()])
    assert [t.split("[")[1] for t, _ in res.candidates] == ["fake candidate 0].", "fake candidate 1].", "fake candidate 2]."]
    scores = [s for _, s in res.candidates]
    assert scores[0] is None  # 'zzzz' predicts nothing: no score (NULL), not a measured 0
    assert scores[1] == pytest.approx(1.0, abs=0.01)  # 'cat': right but for a little noise
    assert 0 < scores[2] < scores[1]  # 'cat', 'dog': dog is wrong on the held-out sequences
    assert res.text == "Fires on 'cat' [fake candidate 1]." and res.score == scores[1]
    assert res.summary == "'cat' tokens"
    (explain,) = fake.explain_bodies()  # one request with the API's n
    assert explain["n"] == 3 and explain["temperature"] == 1.0 and explain["model"] == MODEL
    sims = [b for b in fake.bodies if b not in fake.explain_bodies()]
    assert all(b["temperature"] == 0.0 and "n" not in b for b in sims)
    assert len(sims) == 3 * 3  # 3 candidates × 3 unique held-out sequences (two are the same)
    assert all("<s>" not in b["messages"][-1]["content"] for b in sims)
    assert ex.stats["sim_failures"] == 0


def test_a_server_that_ignores_n_is_topped_up_with_seeded_requests(fake):
    fake.honour_n = False
    with LLMExplainer(config(fake, n=3)) as ex:
        (res,) = ex.explain_many([cat_job()])
    assert len(res.candidates) == 3 and "candidate 1" in res.text
    assert [b.get("seed") for b in fake.explain_bodies()] == [None, 1, 2]


def test_summary_is_cut_to_14_words(fake):
    fake.summary = " ".join(["word"] * 30)
    with LLMExplainer(config(fake, n=2)) as ex:
        (res,) = ex.explain_many([cat_job()])
    assert res.summary == " ".join(["word"] * 14)


def test_malformed_simulation_falls_back_to_zeros_and_is_counted(fake):
    fake.sim_reply = "I think the activations are [1, 2"
    with LLMExplainer(config(fake, n=2)) as ex:
        (res,) = ex.explain_many([cat_job()])
        assert ex.stats["sim_failures"] == 2 * 3
    # unparseable simulations predict nothing: no score (NULL), and the first candidate is kept
    assert all(s is None for _, s in res.candidates) and "candidate 0" in res.text


def test_inactive_polarity_needs_no_request(fake):
    job = cat_job()
    job.polarity = -1  # every activation is ≥ 0: nothing is active in polarity −1
    with LLMExplainer(config(fake)) as ex:
        (res,) = ex.explain_many([job])
        assert ex.score_many([ScoreJob(INACTIVE, -1, job.heldout_tokens, job.heldout_acts)]) == [None]  # no prediction
    assert (res.text, res.score) == (INACTIVE, None) and fake.bodies == []


def test_concurrency_overlaps_requests(fake):
    fake.delay = 0.05
    jobs = [cat_job(f"0:{i}:1") for i in range(8)]
    t0 = time.perf_counter()
    with LLMExplainer(config(fake, n=1, concurrency=4)) as ex:
        ex.explain_many(jobs)
    assert 1 < fake.max_in_flight <= 4
    assert time.perf_counter() - t0 < 0.05 * len(fake.bodies) * 0.6


# -- retries, errors, cache ------------------------------------------------------------------
MSGS = [{"role": "system", "content": "simulate"}, {"role": "user", "content": "Neuron description: 'a'\n\nTokens (1):\n[\"a\"]\n"}]


def test_retries_429_and_500_honouring_retry_after(fake):
    fake.plan = [("status", 429, {"Retry-After": "0.3"}), ("status", 500, {})]
    client = ChatClient(config(fake, max_retries=3))
    t0 = time.perf_counter()
    assert client.chat(MSGS) == ["[10]"]
    assert time.perf_counter() - t0 >= 0.3
    assert len(fake.bodies) == 3 and client.stats["retries"] == 2


def test_retries_a_timeout(fake):
    fake.plan = [("sleep", 1.0)]
    client = ChatClient(config(fake, timeout=0.3, max_retries=2))
    assert client.chat(MSGS) == ["[10]"]
    assert len(fake.bodies) == 2


def test_gives_up_after_max_retries_with_one_line_error(fake, tmp_path):
    fake.plan = [("status", 503, {})] * 3
    client = ChatClient(config(fake, max_retries=2), RequestCache(tmp_path / "c.sqlite"))
    with pytest.raises(MonitorError, match=r"kept failing \(HTTP 503.*after 2 retries") as err:
        client.chat(MSGS)
    assert "\n" not in str(err.value) and len(fake.bodies) == 3


def test_cache_makes_a_second_run_send_nothing(fake, tmp_path):
    jobs = [cat_job("0:0:1"), cat_job("0:1:1")]
    with LLMExplainer(config(fake, n=3), tmp_path / CACHE_NAME) as ex:
        first = ex.explain_many(jobs)
        sent = len(fake.bodies)
        assert sent > 0 and ex.stats["requests"] == sent
    with LLMExplainer(config(fake, n=3), tmp_path / CACHE_NAME) as ex:
        again = ex.explain_many(jobs)
        scores = ex.score_many([ScoreJob(r.text, 1, j.heldout_tokens, j.heldout_acts) for r, j in zip(first, jobs)])
        assert ex.stats["requests"] == 0 and ex.stats["cache_hits"] > 0
    assert len(fake.bodies) == sent
    assert [(r.text, r.summary, r.score) for r in again] == [(r.text, r.summary, r.score) for r in first]
    assert scores == [r.score for r in first]
    # the key is over (base_url, model, body), not the API key
    body = {"model": MODEL, "messages": MSGS}
    assert cache_key(fake.url, MODEL, body) != cache_key(fake.url, "other", body)
    assert cache_key(fake.url, MODEL, body) == cache_key(fake.url, MODEL, dict(reversed(body.items())))


def test_auth_failure_is_one_line_monitor_error():
    server = FakeLLM(key="right-key")
    try:
        with pytest.raises(MonitorError, match=r"refused the API key \(HTTP 401.*MONITOR_LLM_API_KEY"):
            ChatClient(LLMConfig(base_url=server.url, model=MODEL, api_key="wrong")).chat(MSGS)
        with pytest.raises(MonitorError, match="HTTP 401"):
            with LLMExplainer(LLMConfig(base_url=server.url, model=MODEL)) as ex:
                ex.explain_many([cat_job()])
        assert ChatClient(LLMConfig(base_url=server.url, model=MODEL, api_key="right-key")).chat(MSGS) == ["[10]"]
    finally:
        server.close()


def test_bad_url_wrong_path_and_unreachable_endpoint(fake):
    for bad in ("localhost:8000/v1", "ftp://host/v1", "", "http:///v1"):
        with pytest.raises(MonitorError, match="not an http"):
            LLMConfig(base_url=bad, model=MODEL)
    with pytest.raises(MonitorError, match="HTTP 404.*/v1"):
        ChatClient(LLMConfig(base_url=fake.url.replace("/v1", "/api"), model=MODEL)).chat(MSGS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(MonitorError, match="Cannot reach the LLM endpoint"):
        ChatClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL)).chat(MSGS)
    assert time.perf_counter() - t0 < 5  # no retries before anything was ever reached
    assert LLMConfig(base_url=fake.url + "/chat/completions/", model=MODEL).base_url == fake.url


# -- configuration ---------------------------------------------------------------------------
def test_configuration_is_explicit(monkeypatch):
    for var in ("MONITOR_LLM_BASE_URL", "MONITOR_LLM_MODEL", "MONITOR_LLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    from precompute.__main__ import _config, main
    from precompute.pipeline import BuildConfig

    assert resolve_config(environ={}) is None  # nothing configured: offline
    assert resolve_config("offline", environ={"MONITOR_LLM_BASE_URL": "http://x/v1", "MONITOR_LLM_MODEL": "m"}) is None
    env = {"MONITOR_LLM_BASE_URL": "http://x/v1/", "MONITOR_LLM_MODEL": "m", "MONITOR_LLM_API_KEY": "sk-secret"}
    cfg = resolve_config(environ=env, n=7, concurrency=None)
    assert (cfg.base_url, cfg.model, cfg.api_key, cfg.n, cfg.concurrency) == ("http://x/v1", "m", "sk-secret", 7, 8)
    assert (cfg.explainer_id, cfg.scorer_id) == ("llm:m", "llm-sim:m")
    assert resolve_config("llm", "http://y/v1", "n2", environ=env).base_url == "http://y/v1"  # flags win
    with pytest.raises(MonitorError, match="needs an endpoint and a model"):
        resolve_config("llm", environ={})
    with pytest.raises(MonitorError, match="no endpoint"):
        resolve_config(environ={"MONITOR_LLM_MODEL": "m"})
    # the key never reaches the build's identity (config.json, database meta) or a repr
    ident = BuildConfig(llm=cfg).identity()
    assert ident["llm"]["model"] == "m" and "sk-secret" not in json.dumps(ident) and "sk-secret" not in repr(cfg)
    assert "llm" not in BuildConfig().identity()  # offline builds keep their old identity

    import argparse

    from precompute.__main__ import _config_args

    p = argparse.ArgumentParser()
    _config_args(p)
    args = p.parse_args(["--explainer", "llm", "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--llm-n", "3"])
    built = _config(args)
    assert built.llm.n == 3 and built.llm.model == "m"
    assert _config(p.parse_args(["--explainer", "offline"])).llm is None
    assert main(["status", "--explainer", "llm", "--work-dir", "/nonexistent/x"]) == 2  # one-line error, exit 2


# -- end to end ------------------------------------------------------------------------------
def test_pipeline_builds_a_database_with_llm_descriptions(fake, tiny_llama_dir, tmp_path):
    import duckdb

    from precompute.pipeline import Build, BuildConfig

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers to find 42 apples 7 pears and bread".split()
    docs = [" ".join(rng.choice(words, size=60)) + "." for _ in range(40)]
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(docs))
    fake.key = "sk-test"
    llm = config(fake, n=2, concurrency=8)
    cfg = BuildConfig(model=str(tiny_llama_dir), files=[str(corpus)], seq_len=16, n_sequences=24, batch_size=8,
                      k=8, n_random=3, layers="1", work_dir=str(tmp_path / "build"), db=str(tmp_path / "n.duckdb"), llm=llm)
    build = Build(cfg, progress=False)
    path = build.run()
    n_features = 2 * 96
    assert 0 < len(fake.explain_bodies()) <= n_features
    descriptions = build.stage_info("descriptions")
    scores_info = build.stage_info("scores")
    assert descriptions["explainer"] == f"llm:{MODEL}" and descriptions["requests"] == len(fake.bodies)
    assert scores_info["scorer"] == f"llm-sim:{MODEL}" and scores_info["requests"] == 0  # all from the cache
    assert (build.root / CACHE_NAME).exists()
    assert "sk-test" not in (build.root / "config.json").read_text()

    con = duckdb.connect(str(path), read_only=True)
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    assert meta["explainer"] == f"llm:{MODEL}" and meta["scorer"] == f"llm-sim:{MODEL}"
    assert "sk-test" not in json.dumps(meta)
    rows = con.execute("SELECT text, summary, score, explainer FROM descriptions").fetchall()
    con.close()
    assert len(rows) == n_features
    assert {r[3] for r in rows} == {f"llm:{MODEL}"}
    assert all("[fake candidate" in r[0] or r[0] == INACTIVE for r in rows)
    assert any("[fake candidate 1]" in r[0] for r in rows)
    assert all(len(r[1].split()) <= 14 for r in rows)
    # no score (NULL) only where nothing is predicted: an inactive polarity, or only 'zzzz' left
    assert all(r[2] is not None or r[0] == INACTIVE or "[fake candidate 0]" in r[0] for r in rows)
    assert max(r[2] for r in rows if r[2] is not None) > 0.2

    # a re-run of the LLM stages (e.g. after a kill) sends nothing new
    sent = len(fake.bodies)
    for stage in ("descriptions", "scores"):
        (build.root / f"{stage}.done").unlink()
        for f in (build.root / stage).glob("*.parquet"):
            f.unlink()
    build.run_descriptions()
    build.run_scores()
    assert len(fake.bodies) == sent and build.stage_info("scores")["requests"] == 0
