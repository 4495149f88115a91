"""The optional LLM explainer and simulator, over any OpenAI-compatible chat endpoint.

Offline is the default: nothing here runs, and nothing is ever sent anywhere, unless an
endpoint is configured explicitly, either in Python (``BuildConfig(llm=LLMConfig(...))``)
or on the command line::

    export MONITOR_LLM_BASE_URL=https://api.openai.com/v1   # or http://localhost:8000/v1 (vLLM, llama.cpp …)
    export MONITOR_LLM_MODEL=gpt-4o-mini
    export MONITOR_LLM_API_KEY=sk-...                        # optional for local servers
    python -m precompute build --model embedded              # the env vars switch the LLM on

    python -m precompute build --explainer llm --llm-base-url http://localhost:8000/v1 --llm-model M
    python -m precompute build --explainer offline           # ignore the env vars

The key is read from ``MONITOR_LLM_API_KEY`` only (never a flag, never written to disk).
The build records ``explainer = llm:<model>`` and ``scorer = llm-sim:<model>`` in the
database's meta table and in each description's ``explainer`` column.

Explainer
---------
Per (neuron, polarity), the explainer sees up to ``max_exemplars`` (default 20; 10–20 in
the reference) of the neuron's **train** top exemplars, in a shuffled order that is a
deterministic function of (layer, neuron, polarity) so that re-runs produce identical
requests (and hit the cache). In each exemplar the tokens at or above 50% of that
sequence's extreme, signed by polarity (``polarity × act ≥ 0.5 × max(polarity × act)``),
are wrapped in double braces; the first ``skip_prefix`` tokens (the attention sink) are
left out. The prompt is::

    system: You are an interpretability researcher studying a single neuron … marked like {{this}} …
            Answer in exactly two lines:
            Description: <one short sentence …>
            Summary: <the same in under 15 words>
    user:   Excerpts (in random order), the neuron's most active tokens marked like {{this}}:

            Excerpt 1: In the beginning God created the {{heaven}} and the {{earth}}.
            Excerpt 2: …

It samples ``n`` candidates (default 5) at ``temperature`` (default 1.0): one request
with the API's ``n`` parameter; a server that returns fewer choices is topped up with
single-choice requests that differ by a ``seed`` field (or, with ``use_n=False``, all
``n`` are such requests). Each candidate is scored by simulation (below) on the neuron's
held-out sequences and the best is kept (ties: the earlier candidate). Its summary is
the ``Summary:`` line of the same answer (or, if missing, the description), cut to 14
words. A (neuron, polarity) with no activating exemplar gets :data:`INACTIVE` and score 0
without any request.

Note that the best of ``n`` is chosen *and* reported on the same held-out sequences (as
the brief specifies), so a score is optimistic by the selection; with ``n = 1`` it is not.

Simulator
---------
Given a description and one sequence's tokens (after the skipped prefix), the LLM
predicts a 0–10 activation per token, at temperature 0::

    system: You simulate a neuron of a language model from a description of what it fires on …
            Reply with only a JSON list of integers, one per token, in order.
    user:   Neuron description: <description>

            Tokens (N):
            ["The", " Lord", " said", …]

            Reply with a JSON list of exactly N integers from 0 to 10.

The reply is parsed leniently (:func:`parse_simulation`: code fences and prose around
the list are ignored, numbers are clamped to 0–10); an answer with no list of exactly
N numbers counts as a failure (``stats["sim_failures"]``) and simulates as zeros. The
score is :func:`precompute.simulate.pearson` between the polarity-signed true
activations and the simulated ones, pooled over every token (after the skipped prefix)
of the held-out sequences: the test top exemplars plus the random sequences.
Identical (description, sequence) pairs are simulated once.

Engineering
-----------
* **Concurrency**: a thread pool of ``concurrency`` workers (default 8) sends requests.
* **Retries**: HTTP 429 and 5xx, timeouts, dropped connections and unparseable response
  bodies are retried up to ``max_retries`` times (default 5), waiting the response's
  ``Retry-After`` (seconds or an HTTP date, at most 600 s) when given, otherwise
  ``min(max_backoff, backoff × 2^attempt)`` seconds × a random factor in [0.5, 1]
  (defaults 1 s and 60 s). Then the build stops with a :class:`MonitorError`; a re-run
  resumes from the cache.
* **Errors** (one-line :class:`MonitorError`): a base URL that is not http(s); 401/403
  (the key); 404 (the base URL should end in ``/v1``); other 4xx (the server's message);
  an endpoint that cannot be reached (refused, unknown host) before any request succeeded.
* **Cache**: every answer is stored in a sqlite3 file (``<build folder>/llm-cache.sqlite``),
  keyed by ``sha256(json.dumps({"base_url", "model", "body"}, sort_keys=True))`` where
  ``body`` is the full request body (messages, n, temperature, max_tokens, seed). The API
  key is not part of the key. A re-run sends nothing; a killed build resumes where it
  stopped, inside a layer too.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import ProxyHandler, Request, build_opener

import numpy as np

from engine.errors import MonitorError

from .simulate import pearson

ENV_BASE_URL = "MONITOR_LLM_BASE_URL"
ENV_MODEL = "MONITOR_LLM_MODEL"
ENV_API_KEY = "MONITOR_LLM_API_KEY"
CACHE_NAME = "llm-cache.sqlite"
PROMPT_VERSION = "llm-v1"
SUMMARY_WORDS = 14  # "under 15 words"
MARK_FRACTION = 0.5
INACTIVE = "Never active in this polarity on the corpus."
INACTIVE_SUMMARY = "never active"

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher studying a single neuron of a language model. "
    "You are shown text excerpts on which the neuron is strongly active. In each excerpt, the "
    "tokens where the neuron is most active are marked like {{this}}. Work out what the neuron "
    "fires on: which tokens, and in which contexts. Be specific and concise; quote key tokens "
    "in single quotes.\n"
    "Answer in exactly two lines:\n"
    "Description: <one short sentence saying what the neuron fires on>\n"
    "Summary: <the same in under 15 words>"
)
SIMULATE_SYSTEM = (
    "You simulate a neuron of a language model from a description of what it fires on. Given "
    "the description and a text split into tokens, predict the neuron's activation on every "
    "token as an integer from 0 (inactive) to 10 (maximally active). Most tokens are usually 0. "
    "Reply with only a JSON list of integers, one per token, in order."
)


# -- configuration ---------------------------------------------------------------------------
def check_base_url(url: str) -> str:
    """The base URL without a trailing slash (or ``/chat/completions``); MonitorError if not http(s)."""
    u = (url or "").strip().rstrip("/")
    if u.endswith("/chat/completions"):
        u = u[: -len("/chat/completions")]
    p = urlparse(u)
    if p.scheme not in ("http", "https") or not p.netloc or any(c.isspace() for c in u):
        raise MonitorError(
            f"LLM base URL {url!r} is not an http(s) URL; use one like https://api.openai.com/v1 "
            "or http://localhost:8000/v1 (--llm-base-url or MONITOR_LLM_BASE_URL)."
        )
    return u


@dataclass
class LLMConfig:
    """An OpenAI-compatible endpoint and how to use it. Only ``identity()`` reaches disk."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False, compare=False)
    n: int = 5  # candidate descriptions per (neuron, polarity)
    temperature: float = 1.0  # for the candidates; the simulator uses 0
    max_exemplars: int = 20  # train exemplars shown to the explainer
    use_n: bool = True  # ask for the n candidates in one request (the API's n); else n requests
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 60.0  # seconds per request
    backoff: float = 1.0  # first retry wait (seconds), doubled each retry
    max_backoff: float = 60.0
    cache_path: str | None = None  # default: <build folder>/llm-cache.sqlite

    def __post_init__(self):
        self.base_url = check_base_url(self.base_url)
        self.model = (self.model or "").strip()
        if not self.model:
            raise MonitorError("No LLM model name: pass --llm-model or set MONITOR_LLM_MODEL.")
        if self.n < 1:
            raise MonitorError("--llm-n must be at least 1.")
        if self.concurrency < 1:
            raise MonitorError("--llm-concurrency must be at least 1.")
        if self.max_retries < 0:
            raise MonitorError("--llm-max-retries must be 0 or more.")
        if not self.timeout > 0:
            raise MonitorError("--llm-timeout must be positive.")
        if self.max_exemplars < 1:
            raise MonitorError("max_exemplars must be at least 1.")

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
    env = os.environ if environ is None else environ
    if explainer not in (None, "offline", "llm"):
        raise MonitorError(f"--explainer {explainer!r}: use offline or llm.")
    if explainer == "offline":
        return None
    url = base_url or env.get(ENV_BASE_URL) or None
    name = model or env.get(ENV_MODEL) or None
    if explainer is None and not url:
        if name:
            raise MonitorError(f"An LLM model is set ({name!r}) but no endpoint: set {ENV_BASE_URL} "
                               "(or --llm-base-url), or pass --explainer offline.")
        return None
    if not url or not name:
        raise MonitorError(f"The LLM explainer needs an endpoint and a model: pass --llm-base-url and --llm-model "
                           f"(or set {ENV_BASE_URL} and {ENV_MODEL}), or use --explainer offline.")
    extra = {k: v for k, v in options.items() if v is not None}
    return LLMConfig(base_url=url, model=name, api_key=env.get(ENV_API_KEY) or None, **extra)


# -- the request cache -----------------------------------------------------------------------
def cache_key(base_url: str, model: str, body: dict) -> str:
    """sha256 of the canonical JSON of (base_url, model, full request body)."""
    blob = json.dumps({"base_url": base_url, "model": model, "body": body}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    """Answers (a list of choice contents) by request key, in a sqlite3 file; thread-safe."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, contents TEXT NOT NULL)")
        except sqlite3.DatabaseError as err:
            raise MonitorError(f"The LLM request cache {self.path} is unreadable ({err}); delete it to start it afresh.") from None

    def get(self, key: str) -> list[str] | None:
        with self._lock:
            row = self._db.execute("SELECT contents FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, contents: list[str]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(contents, ensure_ascii=False)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- the HTTP client -------------------------------------------------------------------------
def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_detail(err: HTTPError) -> str:
    try:
        raw = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a body we cannot read is no detail
        return err.reason or ""
    try:
        data = json.loads(raw)
        msg = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return _one_line(msg)
    except ValueError:
        return _one_line(raw or err.reason or "")


def retry_after(value: str | None, cap: float = 600.0) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        secs = float(value)
    except ValueError:
        try:
            secs = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(secs, 0.0), cap)


class ChatClient:
    """``POST {base_url}/chat/completions`` with the cache in front and retries behind."""

    def __init__(self, cfg: LLMConfig, cache: RequestCache | None = None):
        self.cfg = cfg
        self.cache = cache
        self.url = cfg.base_url + "/chat/completions"
        # a local server is reached directly, whatever http_proxy says
        self._opener = build_opener(ProxyHandler({})) if _is_loopback(urlparse(self.url).hostname) else build_opener()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}
        self._reached = False
        self.stop = threading.Event()  # set when the batch fails: pending retries stop

    def _count(self, key: str, k: int = 1) -> None:
        with self._lock:
            self.stats[key] += k

    def chat(self, messages: list[dict], *, n: int = 1, temperature: float = 0.0, max_tokens: int = 256,
             seed: int | None = None) -> list[str]:
        """The contents of the answer's choices (``n`` asked; a server may return fewer)."""
        body: dict = {"model": self.cfg.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if n > 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        key = cache_key(self.cfg.base_url, self.cfg.model, body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._count("cache_hits")
                return hit
        contents = self._post(body)
        if self.cache is not None:
            self.cache.put(key, contents)
        return contents

    def _backoff(self, attempt: int) -> float:
        return min(self.cfg.max_backoff, self.cfg.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _unreachable(self, reason) -> MonitorError:
        return MonitorError(f"Cannot reach the LLM endpoint {self.url} ({_one_line(reason, 120)}); check "
                            f"--llm-base-url / {ENV_BASE_URL} and that the server is running.")

    def _post(self, body: dict) -> list[str]:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "monitor-precompute"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if self.stop.is_set():
                raise MonitorError("LLM requests stopped after an earlier error.")
            wait_s = None
            self._count("requests")
            try:
                with self._opener.open(Request(self.url, data=data, headers=headers, method="POST"), timeout=self.cfg.timeout) as resp:
                    raw = resp.read()
                try:
                    answer = json.loads(raw)
                    choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
                    contents = [((c.get("message") or {}).get("content") or "") for c in choices]
                    if not contents:
                        raise ValueError("no choices")
                except (ValueError, KeyError, TypeError, AttributeError) as err:
                    last = f"an unreadable answer: {_one_line(err, 80)}"
                else:
                    self._reached = True
                    return contents
            except HTTPError as err:
                status, detail = err.code, _error_detail(err)
                if status in (401, 403):
                    raise MonitorError(f"The LLM endpoint {self.url} refused the API key (HTTP {status}: {detail}); "
                                       f"set {ENV_API_KEY} to a valid key.") from None
                if status == 404:
                    raise MonitorError(f"No chat-completions endpoint at {self.url} (HTTP 404: {detail}); the base URL "
                                       "usually ends in /v1 (--llm-base-url).") from None
                if status != 429 and status < 500:
                    raise MonitorError(f"The LLM endpoint {self.url} rejected a request (HTTP {status}: {detail}); "
                                       "check --llm-model and the endpoint.") from None
                last = f"HTTP {status}" + (f": {detail}" if detail else "")
                wait_s = retry_after(err.headers.get("Retry-After") if err.headers else None)
            except URLError as err:
                reason = err.reason
                if not isinstance(reason, TimeoutError) and not self._reached:
                    raise self._unreachable(reason) from None
                last = "timed out" if isinstance(reason, TimeoutError) else _one_line(reason, 120)
            except TimeoutError:
                last = "timed out"
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                if isinstance(err, ConnectionRefusedError) and not self._reached:
                    raise self._unreachable(err) from None
                last = _one_line(err, 120) or type(err).__name__
            if attempt == self.cfg.max_retries:
                break
            self._count("retries")
            self.stop.wait(self._backoff(attempt) if wait_s is None else wait_s)
        where = f"; answers so far are cached in {self.cache.path}" if self.cache is not None else ""
        raise MonitorError(f"The LLM endpoint {self.url} kept failing ({_one_line(last, 160)}) after "
                           f"{self.cfg.max_retries} retries; re-run the same command to resume{where}.")


# -- prompts and parsing ---------------------------------------------------------------------
def _shown(token: str) -> str:
    return token.replace("\r", "\\r").replace("\n", "\\n")


def mark_exemplar(tokens: list[str], acts: np.ndarray, polarity: int, skip_prefix: int = 1) -> str | None:
    """One exemplar's text with ``{{…}}`` around the tokens at ≥ 50% of its extreme (signed).

    The first ``skip_prefix`` tokens are left out. None when nothing is active in this
    polarity (the signed maximum is not positive). Leading spaces stay outside the braces.
    """
    signed = polarity * np.asarray(acts, dtype=np.float64)[skip_prefix:]
    toks = tokens[skip_prefix:]
    if not len(signed) or not float(signed.max()) > 0:
        return None
    peak = float(signed.max())
    out = []
    for tok, v in zip(toks, signed):
        t = _shown(tok)
        if v >= MARK_FRACTION * peak:
            core = t.lstrip()
            lead = t[: len(t) - len(core)]
            t = f"{lead}{{{{{core}}}}}" if core else f"{{{{{t}}}}}"
        out.append(t)
    return "".join(out)


def explain_messages(excerpts: list[str]) -> list[dict]:
    body = "\n".join(f"Excerpt {i}: {e}" for i, e in enumerate(excerpts, 1))
    user = ("Excerpts (in random order), the neuron's most active tokens marked like {{this}}:\n\n"
            f"{body}\n\nWhat does this neuron fire on?")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def simulate_messages(description: str, tokens: list[str]) -> list[dict]:
    n = len(tokens)
    user = (f"Neuron description: {description}\n\nTokens ({n}):\n{json.dumps(tokens, ensure_ascii=False)}\n\n"
            f"Reply with a JSON list of exactly {n} integers from 0 to 10.")
    return [{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}]


_LABEL = r"^[\s*_#>\-]*{}[\s*_]*:[\s*_]*(.+?)\s*$"
_DESC = re.compile(_LABEL.format("description"), re.I | re.M)
_SUMMARY = re.compile(_LABEL.format("summary"), re.I | re.M)


def _clean(text: str) -> str:
    text = " ".join(text.replace("**", "").split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"`":
        text = text[1:-1].strip()
    return text


def truncate_words(text: str, n: int = SUMMARY_WORDS) -> str:
    """The first ``n`` words of ``text`` (whitespace-split)."""
    return " ".join(text.split()[:n])


def parse_explanation(answer: str) -> tuple[str, str] | None:
    """(description, summary ≤ 14 words) from an explainer answer, or None if it has no text.

    Reads the ``Description:`` and ``Summary:`` lines (case-insensitive, markdown allowed);
    without a ``Description:`` line, the first line that is not the summary is the
    description; without a summary, the description's first 14 words are.
    """
    m = _DESC.search(answer or "")
    if m:
        desc = _clean(m.group(1))
    else:
        lines = [ln for ln in (answer or "").splitlines() if ln.strip() and not _SUMMARY.match(ln)]
        desc = _clean(lines[0]) if lines else ""
    if not desc:
        return None
    s = _SUMMARY.search(answer or "")
    summary = _clean(s.group(1)) if s else ""
    return desc, truncate_words(summary or desc)


_LIST = re.compile(r"\[[^\[\]]*\]")


def parse_simulation(answer: str, n: int) -> np.ndarray | None:
    """The first JSON list of exactly ``n`` numbers in ``answer``, clamped to [0, 10]; None if none."""
    for m in _LIST.finditer(answer or ""):
        try:
            values = json.loads(m.group(0))
        except ValueError:
            continue
        if len(values) != n:
            continue
        try:
            arr = np.asarray([float(v) for v in values if not isinstance(v, bool)], dtype=np.float32)
        except (TypeError, ValueError):
            continue
        if len(arr) == n and np.isfinite(arr).all():
            return np.clip(arr, 0.0, 10.0)
    return None


# -- explaining and scoring ------------------------------------------------------------------
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
    score: float
    candidates: list[tuple[str, float]]  # every candidate's (description, score), in sampling order


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

    def _scores(self, items: list[tuple[str, int, list]]) -> list[float]:
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
                out.append(0.0)
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
                    out.append(Explanation("(no description: the explainer's answers were empty)", "no description", 0.0, []))
                else:
                    out.append(Explanation(INACTIVE, INACTIVE_SUMMARY, 0.0, []))
                continue
            sc = per_job[i]
            best = int(np.argmax(sc))  # the first of equal scores
            out.append(Explanation(cs[best][0], cs[best][1], sc[best], [(t, s) for (t, _), s in zip(cs, sc)]))
        return out

    def score_many(self, jobs: list[ScoreJob]) -> list[float]:
        """Simulation scores of given descriptions (each unique simulation is cached, so re-scoring is free)."""
        return self._scores([(j.description, j.polarity, self._heldout(j.heldout_tokens, j.heldout_acts)) for j in jobs])


# -- the pipeline stages ---------------------------------------------------------------------
class _Features:
    """The merged exemplars of a build, cut into LLM jobs per (neuron, polarity)."""

    def __init__(self, build):
        from .pipeline import TEST_EVERY

        self.corpus, self.n = build.corpus, build.lm.n_neurons
        col = build.merged()
        self.s = col.state
        self.train_ranks = [r for r in range(col.k) if r % TEST_EVERY != TEST_EVERY - 1]
        self.test_ranks = [r for r in range(col.k) if r % TEST_EVERY == TEST_EVERY - 1]
        self.rnd_tokens = [self.corpus.tokens[i] for i in self.s.random_ids.tolist()]
        self.rnd_acts = self.s.random_acts.float().numpy()  # [R, T, F]

    def _top(self, pi: int, f: int, ranks: list[int]) -> tuple[list[list[str]], np.ndarray]:
        ids = self.s.top_ids[pi, f, ranks].tolist()
        keep = [i for i, sid in enumerate(ids) if 0 <= sid < len(self.corpus)]
        return [self.corpus.tokens[ids[i]] for i in keep], self.s.top_acts[pi, f][ranks][keep].float().numpy()

    def __call__(self, layer: int, neurons: range, with_train: bool):
        """Yields (neuron, polarity, train tokens, train acts [n, T], held-out tokens, held-out acts [m, T]).

        Held out = the test top exemplars (ranks r % 4 == 3) plus the random sequences, as offline."""
        for neuron in neurons:
            f = layer * self.n + neuron
            for pi, pol in ((0, 1), (1, -1)):
                train_toks, train_acts = self._top(pi, f, self.train_ranks) if with_train else ([], None)
                test_toks, test_acts = self._top(pi, f, self.test_ranks)
                held_acts = np.concatenate([test_acts, self.rnd_acts[:, :, f]])
                yield neuron, pol, train_toks, train_acts, test_toks + self.rnd_tokens, held_acts


def run_descriptions(build, chunk: int = 128) -> dict:
    """The descriptions stage with the LLM explainer; writes the same per-layer files as offline.

    Returns the stage marker's info: ``explainer`` (``llm:<model>``) and request counts."""
    import pandas as pd

    from .describe import OutputTokens
    from .pipeline import DESCRIPTION_COLUMNS

    cfg = build.cfg.llm
    features = _Features(build)
    n = build.lm.n_neurons
    outs = OutputTokens(build.lm)
    with LLMExplainer(cfg, build.root / CACHE_NAME, skip_prefix=build.cfg.skip_prefix, progress=build.progress) as ex:

        def layer_rows(layer: int) -> pd.DataFrame:
            promotes, suppresses = outs.layer(layer)
            rows = []
            for a in range(0, n, chunk):
                feats = list(features(layer, range(a, min(a + chunk, n)), with_train=True))
                jobs = [ExplainJob(f"{layer}:{neuron}:{pol}", pol, tt, ta, ht, ha) for neuron, pol, tt, ta, ht, ha in feats]
                for (neuron, pol, *_), r in zip(feats, ex.explain_many(jobs)):
                    rows.append((layer, neuron, pol, r.text, r.summary, ex.explainer_id, promotes[neuron][:10], suppresses[neuron][:10]))
            return pd.DataFrame(rows, columns=DESCRIPTION_COLUMNS)

        build.per_layer("descriptions", f"descriptions ({ex.explainer_id}, per layer)", layer_rows)
        return {"explainer": ex.explainer_id, **ex.stats}


def run_scores(build, chunk: int = 256) -> dict:
    """The scores stage with the LLM simulator (the descriptions stage's simulations come from the cache)."""
    import pandas as pd

    from .pipeline import SCORE_COLUMNS

    cfg = build.cfg.llm
    features = _Features(build)
    n = build.lm.n_neurons
    with LLMExplainer(cfg, build.root / CACHE_NAME, skip_prefix=build.cfg.skip_prefix, progress=build.progress) as ex:

        def layer_rows(layer: int) -> pd.DataFrame:
            text = build.layer_text(layer)
            rows = []
            for a in range(0, n, chunk):
                feats = list(features(layer, range(a, min(a + chunk, n)), with_train=False))
                jobs = [ScoreJob(text[(neuron, pol)], pol, ht, ha) for neuron, pol, _, _, ht, ha in feats]
                rows += [(layer, neuron, pol, sc) for (neuron, pol, *_), sc in zip(feats, ex.score_many(jobs))]
            return pd.DataFrame(rows, columns=SCORE_COLUMNS)

        build.per_layer("scores", f"scores ({ex.scorer_id}, per layer)", layer_rows)
        return {"scorer": ex.scorer_id, **ex.stats}
