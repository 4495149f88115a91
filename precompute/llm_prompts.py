"""The LLM explainer's and simulator's prompts, and the parsing of their answers.

Provides :func:`mark_exemplar` (an exemplar with its most active tokens in ``{{…}}``),
:func:`explain_messages`, :func:`simulate_messages`, :func:`parse_explanation` and
:func:`parse_simulation`. The prompts are quoted in ``precompute/LLM.md``; changing one
changes :data:`PROMPT_VERSION`, which is part of every request's cache key.
"""

from __future__ import annotations

import json
import re

import numpy as np

PROMPT_VERSION = "llm-v1"
SUMMARY_WORDS = 14  # "under 15 words"
MARK_FRACTION = 0.5

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


