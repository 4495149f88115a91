"""Why a semantic-search result matched: the part of its summary that carries the similarity.

An ``offline-v2`` summary has up to three parts: a position note ("window start:"), the
behaviour (the tokens the neuron fires on, e.g. "' Lord' after ' the'"), and the corpus
source when it is distinctive ("in Bible verses"). :func:`split_summary` cuts a summary
into behaviour and source; :func:`match_reasons` embeds both parts of each result and
reports their cosine to the query next to the whole summary's, plus the evidence the
description states (how many top windows show the tokens, the source's count), so a
reader sees whether a hit came from what the neuron does or from where its text came from.

    behaviour sim = cos(e(behaviour part), q),  source sim = cos(e(source part), q)
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_COUNT = re.compile(r"\((\d+)/(\d+) top windows\)")
_SOURCE = re.compile(r"mostly in ([^;(]+) \((\d+)/(\d+)\)")


def split_summary(summary: str) -> tuple[str, str]:
    """(behaviour, source) parts of a summary; source is "" when it names none."""
    s = (summary or "").strip()
    if s.startswith("window start: "):
        s = s[len("window start: "):]
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
    return pd.DataFrame(rows, index=hits.index)
