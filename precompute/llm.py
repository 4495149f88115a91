"""The optional LLM explainer and simulator over an OpenAI-compatible endpoint (see ``LLM.md``).

Provides:

* :class:`LLMConfig` (an :class:`engine.llm_client.Endpoint` plus the explainer's settings)
  and :func:`resolve_config` (what the command line asked for);
* :class:`LLMExplainer`: best-of-n descriptions by simulation score, and simulation scores;
* :func:`run_descriptions` / :func:`run_scores`: the pipeline's descriptions and scores
  stages with the LLM, writing the same per-layer files as the offline ones.

Offline is the default: nothing here runs unless an endpoint is configured explicitly.
The prompts are in :mod:`precompute.llm_prompts`; the HTTP client, request cache and
retries in :mod:`engine.llm_client`.
"""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from engine.errors import MonitorError, at_least
from engine.llm_client import ENV_BASE_URL, ENV_MODEL, ChatClient, Endpoint, RequestCache, read_env

from .describe import INACTIVE, INACTIVE_SUMMARY
from .exemplar_view import ExemplarView
from .llm_prompts import (PROMPT_VERSION, explain_messages, mark_exemplar, parse_explanation, parse_simulation,
                          simulate_messages)
from .simulate import pearson

CACHE_NAME = "llm-cache.sqlite"


@dataclass
class LLMConfig(Endpoint):
    """An endpoint and how the explainer uses it. Only :meth:`identity` reaches disk."""

    n: int = 5  # candidate descriptions per (neuron, polarity)
    temperature: float = 1.0  # for the candidates; the simulator uses 0
    max_exemplars: int = 20  # train exemplars shown to the explainer
    use_n: bool = True  # ask for the n candidates in one request (the API's n); else n requests
    concurrency: int = 8
    cache_path: str | None = None  # default: <build folder>/llm-cache.sqlite

    def __post_init__(self):
        super().__post_init__()
        at_least(self.n, 1, "--llm-n")
        at_least(self.concurrency, 1, "--llm-concurrency")
        at_least(self.max_exemplars, 1, "max_exemplars")

    @property
    def explainer_id(self) -> str:
        return f"llm:{self.model}"

    @property
    def scorer_id(self) -> str:
        return f"llm-sim:{self.model}"

    def identity(self) -> dict:
        """The settings that change the descriptions (no key, no concurrency or retry policy)."""
        return {"base_url": self.base_url, "model": self.model, "n": self.n, "temperature": self.temperature,
                "max_exemplars": self.max_exemplars, "use_n": self.use_n, "prompt_version": PROMPT_VERSION}


def resolve_config(explainer: str | None = None, base_url: str | None = None, model: str | None = None,
                   environ=None, **options) -> LLMConfig | None:
    """The LLM configuration the CLI asked for, or None for the offline explainer.

    ``explainer``: "offline" (never the LLM), "llm" (needs a base URL and a model from the
    flags or the environment), or None: the LLM when a base URL is given by flag or by
    ``MONITOR_LLM_BASE_URL``, offline otherwise. The key comes from ``MONITOR_LLM_API_KEY``.
    ``options`` are other :class:`LLMConfig` fields (None values are ignored).
    """
    if explainer not in (None, "offline", "llm"):
        raise MonitorError(f"--explainer {explainer!r}: use offline or llm.")
    if explainer == "offline":
        return None
    env_url, env_model, key = read_env(environ)
    url, name = base_url or env_url, model or env_model
    if explainer is None and not url:
        if name:
            raise MonitorError(f"An LLM model is set ({name!r}) but no endpoint: set {ENV_BASE_URL} "
                               "(or --llm-base-url), or pass --explainer offline.")
        return None
    if not url or not name:
        raise MonitorError(f"The LLM explainer needs an endpoint and a model: pass --llm-base-url and --llm-model "
                           f"(or set {ENV_BASE_URL} and {ENV_MODEL}), or use --explainer offline.")
    extra = {k: v for k, v in options.items() if v is not None}
    return LLMConfig(base_url=url, model=name, api_key=key, **extra)


@dataclass
class ExplainJob:
    """One (neuron, polarity): train exemplars for the prompt, held-out sequences for the score."""

    key: str  # e.g. "layer:neuron:polarity"; seeds the exemplar shuffle
    polarity: int
    train_tokens: list[list[str]]
    train_acts: np.ndarray  # [n_train, T] raw activations
    heldout_tokens: list[list[str]]
    heldout_acts: np.ndarray  # [n_heldout, T] raw activations (test top exemplars + random sequences)


@dataclass
class ScoreJob:
    description: str
    polarity: int
    heldout_tokens: list[list[str]]
    heldout_acts: np.ndarray  # [n_heldout, T]


@dataclass
class Explanation:
    text: str
    summary: str
    score: float | None  # None: no prediction
    candidates: list[tuple[str, float | None]]  # every candidate's (description, score), in sampling order


class LLMExplainer:
    """Explains and scores neurons with the endpoint of ``cfg``; use as a context manager."""

    def __init__(self, cfg: LLMConfig, cache_path: str | os.PathLike | None = None, skip_prefix: int = 1,
                 progress: bool = False):
        self.cfg = cfg
        path = cfg.cache_path or cache_path
        self.cache = RequestCache(path) if path else None
        self.client = ChatClient(cfg, self.cache)
        self.skip = skip_prefix
        self.progress = progress
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="llm")
        self._lock = threading.Lock()
        self.failures = {"sim_failures": 0, "explain_failures": 0}

    @property
    def explainer_id(self) -> str:
        return self.cfg.explainer_id

    @property
    def scorer_id(self) -> str:
        return self.cfg.scorer_id

    @property
    def scorer_version(self) -> str:
        return PROMPT_VERSION

    def score_windows(self, items: list[tuple[str, int, object]]) -> list[float | None]:
        """Scores of (description, polarity, :class:`~precompute.exemplar_view.Windows`) triples."""
        return self._scores([(t, p, self._heldout(w.tokens, w.acts)) for t, p, w in items])

    @property
    def stats(self) -> dict:
        """Requests sent (attempts, retries included), cache hits, retries and parse failures so far."""
        return {**self.client.stats, **self.failures}

    def __enter__(self) -> "LLMExplainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.cache is not None:
            self.cache.close()

    def _fail(self, key: str) -> None:
        with self._lock:
            self.failures[key] += 1

    # -- single requests (called on the pool) -------------------------------------------
    def explain_prompt(self, job: ExplainJob) -> list[dict] | None:
        """The explainer messages for ``job``, or None when no train exemplar is active."""
        excerpts = [mark_exemplar(t, a, job.polarity, self.skip)
                    for t, a in zip(job.train_tokens[: self.cfg.max_exemplars], job.train_acts[: self.cfg.max_exemplars])]
        excerpts = [e for e in excerpts if e is not None]
        if not excerpts:
            return None
        random.Random(f"{PROMPT_VERSION}:{job.key}").shuffle(excerpts)
        return explain_messages(excerpts)

    def candidates(self, messages: list[dict]) -> list[tuple[str, str]]:
        """Up to ``n`` distinct (description, summary) candidates for one prompt."""
        cfg = self.cfg
        answers: list[str] = []
        if cfg.use_n:
            answers = self.client.chat(messages, n=cfg.n, temperature=cfg.temperature)[: cfg.n]
        for seed in range(len(answers), cfg.n):
            answers += self.client.chat(messages, n=1, temperature=cfg.temperature, seed=seed)[:1]
        out, seen = [], set()
        for a in answers:
            parsed = parse_explanation(a)
            if parsed is None:
                self._fail("explain_failures")
            elif parsed[0] not in seen:
                seen.add(parsed[0])
                out.append(parsed)
        return out

    def simulate(self, description: str, tokens: list[str]) -> np.ndarray:
        """Simulated 0–10 activations ``[len(tokens)]``; zeros (and a counted failure) if unparseable."""
        answer = self.client.chat(simulate_messages(description, tokens), n=1, temperature=0.0,
                                  max_tokens=8 * len(tokens) + 32)
        sim = parse_simulation(answer[0] if answer else "", len(tokens))
        if sim is None:
            self._fail("sim_failures")
            return np.zeros(len(tokens), dtype=np.float32)
        return sim

    # -- batches ----------------------------------------------------------------------------
    def _run(self, calls: dict, desc: str) -> dict:
        """Run ``{key: (fn, *args)}`` on the pool; ``{key: result}``. The first error stops the rest."""
        from tqdm.auto import tqdm

        futs = {self.pool.submit(*c): k for k, c in calls.items()}
        out = {}
        bar = tqdm(total=len(futs), desc=desc, unit="req", leave=False, disable=not self.progress or not futs,
                   dynamic_ncols=True)
        try:
            for f in as_completed(futs):
                out[futs[f]] = f.result()  # re-raises a worker's MonitorError
                bar.update(1)
        except BaseException:
            self.client.stop.set()  # requests waiting to retry give up at once
            for f in futs:
                f.cancel()
            raise
        finally:
            bar.close()
        return out

    def _heldout(self, tokens: list[list[str]], acts: np.ndarray) -> list[tuple[tuple[str, ...], np.ndarray]]:
        a = np.asarray(acts, dtype=np.float32)
        return [(tuple(t[self.skip:]), a[i, self.skip:]) for i, t in enumerate(tokens)]

    def _scores(self, items: list[tuple[str, int, list]]) -> list[float | None]:
        """Scores of ``(description, polarity, heldout)`` triples, simulating each unique pair once."""
        calls = {}
        for text, _, held in items:
            if text == INACTIVE:
                continue
            for toks, _ in held:
                if toks and (text, toks) not in calls:
                    calls[(text, toks)] = (self.simulate, text, list(toks))
        sims = self._run(calls, "simulate")
        out = []
        for text, pol, held in items:
            held = [(t, a) for t, a in held if t]
            if text == INACTIVE or not held:
                out.append(None)  # no prediction: NULL, not a measured 0
                continue
            true = np.concatenate([pol * a for _, a in held])
            out.append(pearson(true, np.concatenate([sims[(text, t)] for t, _ in held])))
        return out

    def explain_many(self, jobs: list[ExplainJob]) -> list[Explanation]:
        """The best of ``n`` candidate descriptions per job, by simulation score on its held-out sequences."""
        prompts = [self.explain_prompt(j) for j in jobs]
        cands = self._run({i: (self.candidates, p) for i, p in enumerate(prompts) if p is not None}, "explain")
        items, owner = [], []
        for i, job in enumerate(jobs):
            held = self._heldout(job.heldout_tokens, job.heldout_acts)
            for text, _ in cands.get(i, []):
                items.append((text, job.polarity, held))
                owner.append(i)
        scores = self._scores(items)
        per_job: dict[int, list[float]] = {}
        for i, s in zip(owner, scores):
            per_job.setdefault(i, []).append(s)
        out = []
        for i, job in enumerate(jobs):
            cs = cands.get(i, [])
            if not cs:
                if prompts[i] is not None:  # the LLM answered, but with nothing usable
                    out.append(Explanation("(no description: the explainer's answers were empty)", "no description", None, []))
                else:
                    out.append(Explanation(INACTIVE, INACTIVE_SUMMARY, None, []))
                continue
            sc = per_job[i]
            best = int(np.argmax([-np.inf if x is None else x for x in sc]))  # the first of equal scores
            out.append(Explanation(cs[best][0], cs[best][1], sc[best], [(t, s) for (t, _), s in zip(cs, sc)]))
        return out

    def score_many(self, jobs: list[ScoreJob]) -> list[float | None]:
        """Simulation scores of given descriptions (each unique simulation is cached, so re-scoring is free)."""
        return self._scores([(j.description, j.polarity, self._heldout(j.heldout_tokens, j.heldout_acts)) for j in jobs])


def run_descriptions(build, chunk: int = 128) -> dict:
    """The descriptions stage with the LLM explainer; writes the same per-layer files as offline.

    Returns the stage marker's info: ``explainer`` (``llm:<model>``) and request counts."""
    import pandas as pd

    from .describe import OutputTokens
    from .pipeline import DESCRIPTION_COLUMNS

    cfg = build.cfg.llm
    view = ExemplarView.of_build(build)
    n = build.lm.n_neurons
    outs = OutputTokens(build.lm)
    with LLMExplainer(cfg, build.root / CACHE_NAME, skip_prefix=0, progress=build.progress) as ex:  # the view drops the sink

        def layer_rows(layer: int) -> pd.DataFrame:
            promotes, suppresses = outs.layer(layer)
            rows = []
            for a in range(0, n, chunk):
                feats = list(view.features(layer, range(a, min(a + chunk, n)), with_train=True))
                jobs = [ExplainJob(f"{layer}:{neuron}:{pol}", pol, tt, ta, ht, ha) for neuron, pol, tt, ta, ht, ha in feats]
                for (neuron, pol, *_), r in zip(feats, ex.explain_many(jobs)):
                    rows.append((layer, neuron, pol, r.text, r.summary, ex.explainer_id, promotes[neuron][:10], suppresses[neuron][:10]))
            return pd.DataFrame(rows, columns=DESCRIPTION_COLUMNS)

        build.per_layer("descriptions", f"descriptions ({ex.explainer_id}, per layer)", layer_rows)
        return {"explainer": ex.explainer_id, **ex.stats}


def open_scorer(build) -> "LLMExplainer":
    """The LLM simulator for the scores stage (close it when done; the descriptions stage's
    simulations come from the request cache). Its windows come from the exemplar view, which
    has already removed the sink position."""
    return LLMExplainer(build.cfg.llm, build.root / CACHE_NAME, skip_prefix=0, progress=build.progress)
