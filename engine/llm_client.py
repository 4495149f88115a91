"""A client for OpenAI-compatible chat endpoints: configuration, request cache, retries.

Provides:

* :func:`read_env`: the one place ``MONITOR_LLM_BASE_URL``, ``MONITOR_LLM_MODEL`` and
  ``MONITOR_LLM_API_KEY`` are read;
* :class:`Endpoint`: base URL, model, key (never written anywhere) and the retry policy;
* :class:`RequestCache`: answers by request key in a sqlite3 file (a re-run sends nothing);
* :class:`ChatClient`: ``POST {base_url}/chat/completions`` with the cache in front and
  retries behind.

Nothing is contacted unless an endpoint is configured explicitly. Users: the optional LLM
explainer and simulator (:mod:`precompute.llm`) and the concept linter's cluster labels
(:mod:`concepts.lint`). Details of the retry and error policy: ``precompute/LLM.md``.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import ProxyHandler, Request, build_opener

from .errors import MonitorError, at_least

ENV_BASE_URL = "MONITOR_LLM_BASE_URL"
ENV_MODEL = "MONITOR_LLM_MODEL"
ENV_API_KEY = "MONITOR_LLM_API_KEY"


def read_env(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None, str | None]:
    """(base URL, model, API key) from ``MONITOR_LLM_*``, each None when unset or blank."""
    env = os.environ if environ is None else environ
    return tuple((env.get(k) or "").strip() or None for k in (ENV_BASE_URL, ENV_MODEL, ENV_API_KEY))


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
class Endpoint:
    """An OpenAI-compatible endpoint and the retry policy for it. The key never reaches disk."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False, compare=False)
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5
    backoff: float = 1.0  # first retry wait (seconds), doubled each retry
    max_backoff: float = 60.0

    def __post_init__(self):
        self.base_url = check_base_url(self.base_url)
        self.model = (self.model or "").strip()
        if not self.model:
            raise MonitorError(f"No LLM model name: pass --llm-model or set {ENV_MODEL}.")
        at_least(self.max_retries, 0, "--llm-max-retries")
        if not self.timeout > 0:
            raise MonitorError("--llm-timeout must be positive.")


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

    def __init__(self, cfg: Endpoint, cache: RequestCache | None = None, agent: str = "neuron-monitor"):
        self.cfg = cfg
        self.cache = cache
        self.agent = agent
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
        return MonitorError(f"Cannot reach the LLM endpoint {self.url} ({_one_line(reason, 120)}): it is unreachable; "
                            f"check {ENV_BASE_URL} (or --llm-base-url) and that the server is running.")

    def _post(self, body: dict) -> list[str]:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": self.agent}
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
