"""The concept linter's database side: descriptions of a trace's important neurons, and LLM labels.

Provides:

* :func:`lint_trace`: gather a trace's important neurons (:func:`engine.linter.important_neurons`,
  normalised by the database's :func:`concepts.resolve.activation_view`), their description
  embeddings and summaries, embed the conversation, calibrate the spurious flag on random
  database descriptions, and run :func:`engine.linter.lint`;
* :func:`neuron_texts` and :func:`random_description_vectors`: those database lookups;
* :class:`LLMLabeler` / :func:`parse_llm_label`: optional 2–5 word cluster labels from an
  OpenAI-compatible endpoint (explicit configuration only).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from engine.errors import MonitorError
from engine.llm_client import ENV_BASE_URL, ENV_MODEL, ChatClient, Endpoint, read_env

from .resolve import EmbedFn, activation_view, embed_one

DEFAULT_NULL_SIZE = 2000


@dataclass
class LLMLabeler:
    """Labels clusters through an OpenAI-compatible ``/chat/completions`` endpoint
    (:class:`engine.llm_client.ChatClient`, one quick retry, no request cache).

    Configured explicitly: :meth:`from_env` reads ``MONITOR_LLM_BASE_URL`` (e.g.
    ``http://127.0.0.1:8000/v1``), ``MONITOR_LLM_MODEL`` and optional ``MONITOR_LLM_API_KEY``
    through :func:`engine.llm_client.read_env`; nothing is contacted unless they are set.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 30.0
    max_descriptions: int = 20

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "LLMLabeler | None":
        url, model, key = read_env(env)
        if not url and not model:
            return None
        if not url or not model:
            raise MonitorError(f"Set both {ENV_BASE_URL} and {ENV_MODEL} for LLM cluster labels "
                               "(or neither, for offline labels).")
        return cls(url, model, key)

    def messages(self, descriptions: Sequence[str]) -> list[dict]:
        """The chat messages for one cluster."""
        listed = "\n".join(f"- {d}" for d in list(descriptions)[: self.max_descriptions])
        return [
            {"role": "system", "content": "You name concepts shared by groups of neuron descriptions."},
            {"role": "user", "content": (
                "These descriptions belong to neurons that were clustered together:\n" + listed + "\n\n"
                "Reply with JSON only: {\"label\": \"<the shared concept in 2 to 5 words>\", "
                "\"coherence\": <an integer from 1 (unrelated) to 5 (one clear concept)>}")},
        ]

    def label(self, descriptions: Sequence[str]) -> tuple[str, int | None]:
        """(label of 2–5 words, coherence 1–5 or None); raises MonitorError on failure."""
        endpoint = Endpoint(self.base_url, self.model, self.api_key, timeout=self.timeout, max_retries=1,
                            backoff=0.5, max_backoff=2.0)
        answers = ChatClient(endpoint, agent="neuron-monitor-linter").chat(self.messages(descriptions), temperature=0,
                                                                           max_tokens=64)
        return parse_llm_label(answers[0])


def parse_llm_label(content: str) -> tuple[str, int | None]:
    """Read ``{"label": ..., "coherence": ...}`` from a reply (tolerates prose around the JSON)."""
    data = None
    m = re.search(r"\{.*\}", str(content), re.S)
    if m:
        try:
            data = json.loads(m.group(0))
        except ValueError:
            data = None
    if isinstance(data, dict) and str(data.get("label", "")).strip():
        label = str(data["label"])
        try:
            coherence = int(round(float(data.get("coherence"))))
            coherence = min(5, max(1, coherence))
        except (TypeError, ValueError):
            coherence = None
    else:
        label, coherence = str(content), None
    words = re.sub(r"[\"'`*#]", "", label).split()
    if not words:
        raise MonitorError("The LLM labeler returned an empty label.")
    return " ".join(words[:5]), coherence


def neuron_texts(db, keys: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, list[str | None]]:
    """(embeddings float32 [m, d], summaries [m]) of (layer, neuron, polarity) keys.

    Rows for keys without a description are zeros and their summary is None.
    """
    m = len(keys)
    index = db.index
    out = np.zeros((m, index.dim), np.float32)
    if m == 0:
        return out, []
    arr = np.asarray(keys, np.int64).reshape(-1, 3)
    codes, ok = db.keys.codes(arr[:, 0], arr[:, 1], arr[:, 2])
    rows = np.where(ok, index.row_of[np.where(ok, codes, 0)], -1)
    out[rows >= 0] = index.mat[rows[rows >= 0]]
    pairs = [(int(l), int(n)) for l, n, _ in keys]
    table = db.descriptions_for(pairs) if pairs else None
    summaries: list[str | None] = []
    for i, (_, _, p) in enumerate(keys):
        if rows[i] < 0:
            summaries.append(None)
            continue
        col = "summary_pos" if int(p) > 0 else "summary_neg"
        value = table[col].iloc[i]
        summaries.append(None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))
    return out, summaries


def random_description_vectors(db, n: int = DEFAULT_NULL_SIZE, seed: int = 0) -> np.ndarray:
    """``n`` description embeddings drawn uniformly without replacement (seeded): [n, d]."""
    index = db.index
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), size=min(int(n), len(index)), replace=False)
    return index.mat[np.sort(rows)]


def lint_trace(db, trace, mode: str = "attribution", k: int | None = None, threshold: float | None = None,
               min_size: int | None = None, percentile: float | None = None, labeler="env",
               embed_fn: EmbedFn | None = None, null_size: int = DEFAULT_NULL_SIZE, seed: int = 0,
               progress=None, lm=None, n_null: int | None = None, causal_progress=None):
    """Run the concept linter on ``trace`` against ``db``; returns an :class:`engine.linter.LintReport`.

    ``labeler="env"`` uses :meth:`LLMLabeler.from_env` (offline labels when
    the variables are unset); pass None for offline labels, or an ``LLMLabeler``.
    The spurious threshold is calibrated per conversation on ``null_size`` random
    descriptions of this database (seeded). With ``lm`` (the trace's model) and an attribution
    trace, every cluster is also checked causally (:func:`engine.linter.causal_check`, ``n_null``
    matched random sets, default 20): its measured effect, null percentile, and the combined flag.
    """
    from engine import linter

    k = linter.DEFAULT_TOP_K if k is None else k
    scale = activation_view(db) if mode == "activation" else None
    hits = linter.important_neurons(trace, mode=mode, k=k, scale=scale)
    emb, summaries = neuron_texts(db, [h.key for h in hits])
    conv = embed_one(linter.conversation_text(trace.rendered), embed_fn)
    calibration = linter.RelevanceCalibration.from_vectors(
        conv, random_description_vectors(db, null_size, seed),
        linter.DEFAULT_PERCENTILE if percentile is None else percentile)
    if labeler == "env":
        labeler = LLMLabeler.from_env()
    report = linter.lint(
        hits, emb, [s or "" for s in summaries], mode=mode,
        threshold=linter.DEFAULT_THRESHOLD if threshold is None else threshold,
        min_size=linter.DEFAULT_MIN_SIZE if min_size is None else min_size,
        calibration=calibration, labeler=labeler, progress=progress)
    if lm is not None and getattr(trace, "objective", None) is not None and report.clusters:
        linter.causal_check(lm, trace, report, n_null=linter.DEFAULT_NULL_SETS if n_null is None else n_null,
                            seed=seed, progress=causal_progress)
    return report
