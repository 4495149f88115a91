"""Why a semantic-search result matched: the part of its summary that carries the similarity.

An ``offline-v3`` summary reads ``[window start: ][diffuse: ]TOKENS in SOURCES (CONTEXT): “SNIPPET”``
(see :mod:`precompute.describe`): the behaviour (the quoted tokens the neuron fires on, e.g.
"' Lord' after ' the'"), then where it happens. ``offline-v2`` summaries were ``TOKENS in SOURCE``
and imported or LLM summaries are free text. :func:`split_summary` cuts a summary into
behaviour and source; :func:`match_reasons` embeds both parts of each result and reports their
cosine to the query next to the whole summary's, plus the evidence the description states (how
many top windows show the tokens, the source's count), so a reader sees whether a hit came from
what the neuron does or from where its text came from.

    behaviour sim = cos(e(behaviour part), q),  source sim = cos(e(source part), q)
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_COUNT = re.compile(r"\((\d+)/(\d+) top windows\)")
_SOURCE = re.compile(r"mostly in ([^;(]+) \((\d+)/(\d+)\)")


_ITEM = r"'[^']*'(?: after '[^']*')?"  # a quoted token (quotes inside are ’), maybe with its previous token
_V3 = re.compile(rf"^(?P<beh>{_ITEM}(?:, {_ITEM})*)(?: in (?P<src>[^(:“]+?))?(?: \((?P<ctx>[^)]*)\))?(?:: “.*”)?$", re.S)


def _notes(summary: str) -> tuple[str, str]:
    """(position notes, rest) of a summary: ``window start: diffuse: 'x'`` → (``window start: diffuse: ``, ``'x'``)."""
    s = (summary or "").strip()
    prefix = ""
    for p in ("window start: ", "diffuse: "):
        if s[len(prefix):].startswith(p):
            prefix += p
    return prefix, s[len(prefix):]


def bare_summary(summary: str) -> str | None:
    """An ``offline-v3`` summary without where it happens: its position notes and tokens only
    (``window start: ',', ' saying'``); None when it is not in that grammar or is bare already."""
    prefix, s = _notes(summary)
    m = _V3.match(s)
    if not m or m.group("beh").strip() == s:
        return None
    return prefix + m.group("beh").strip()


def split_summary(summary: str) -> tuple[str, str]:
    """(behaviour, source) parts of a summary; source is "" when it names none.

    ``window start: ',', ' saying' in Bible verses (lord): “…”`` → (``',', ' saying'``,
    ``Bible verses``); a free-text summary is all behaviour unless it ends in " in <words>"."""
    _, s = _notes(summary)
    m = _V3.match(s)
    if m:
        return m.group("beh").strip(), (m.group("src") or "").strip()
    head, sep, tail = s.rpartition(" in ")
    if sep and "'" not in tail:
        return head.strip(), tail.strip()
    return s, ""


def match_reasons(query_vec: np.ndarray, hits: pd.DataFrame, embed) -> pd.DataFrame:
    """For search results (columns ``summary``, ``description``, ``similarity``): ``behaviour_sim``,
    ``source_sim`` and a one-line ``why``. ``embed`` maps a list of texts to unit vectors [n, d]."""
    q = np.asarray(query_vec, np.float32).reshape(-1)
    q = q / np.linalg.norm(q)
    parts = [split_summary(s) for s in hits["summary"].fillna("")]
    uniq = sorted({p for pair in parts for p in pair if p})
    vec = dict(zip(uniq, embed(uniq) @ q)) if uniq else {}
    rows = []
    for (beh, src), text, sim in zip(parts, hits["description"].fillna(""), hits["similarity"]):
        b, s = vec.get(beh, np.nan), vec.get(src, np.nan)
        bits = [f"behaviour {beh} ({b:.2f})" if beh else "no behaviour named"]
        if src:
            bits.append(f"source {src} ({s:.2f})")
        m = _COUNT.search(text)
        if m:
            bits.append(f"tokens in {m.group(1)}/{m.group(2)} top windows")
        elif "(diffuse)" in text:
            bits.append("diffuse: no token recurs")
        m = _SOURCE.search(text)
        if m:
            bits.append(f"{m.group(2)}/{m.group(3)} windows from {m.group(1).strip()}")
        lead = "behaviour" if not src or (b == b and b >= s) else "source label"
        rows.append({"behaviour_sim": float(b), "source_sim": float(s),
                     "why": f"matched mostly on its {lead}: " + "; ".join(bits)})
    return pd.DataFrame(rows, index=hits.index, columns=["behaviour_sim", "source_sim", "why"])


# Behaviour-first ranking: a result's source label may add at most this share to its behaviour match.
SOURCE_BOOST = 0.25
POOL = 20  # candidates fetched by summary similarity per result kept


def rank_by_behaviour(query_vec: np.ndarray, hits: pd.DataFrame, embed, k: int) -> pd.DataFrame:
    """Re-rank search candidates (more than ``k``, by summary similarity) by what the neuron does:

        behaviour_rank = b · (1 + SOURCE_BOOST · max(s, 0))

    with ``b``, ``s`` the query's cosine to the summary's behaviour and source parts
    (:func:`match_reasons`, whose columns come along). The source label only scales a behaviour
    match, so "Bible verses" ranks a neuron firing on ' verse' or ' God' above one firing on
    commas inside scripture, whose whole-summary similarity comes from "in Bible verses". A summary
    with no behaviour part ranks last. The top ``k``, best first (no rows: the columns alone)."""
    why = match_reasons(query_vec, hits, embed)
    b = why["behaviour_sim"].to_numpy(np.float64)
    s = np.nan_to_num(why["source_sim"].to_numpy(np.float64), nan=0.0)
    rank = np.where(np.isnan(b), -np.inf, np.nan_to_num(b) * (1.0 + SOURCE_BOOST * np.clip(s, 0.0, None)))
    out = pd.concat([hits.reset_index(drop=True), why.reset_index(drop=True)], axis=1)
    out["behaviour_rank"] = rank
    return out.sort_values("behaviour_rank", ascending=False, kind="stable").head(int(k)).reset_index(drop=True)
