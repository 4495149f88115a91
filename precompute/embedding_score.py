"""The embedding scorer (``embedding-auc-v1``), after EleutherAI delphi's: does the description's
embedding pick out the neuron's held-out activating windows from random ones?

For one (neuron, polarity) with description embedding ``d`` (the summary, as embedded for
search), held-out top windows ``P`` (its test exemplars) and held-out random windows ``Q``
(see :mod:`precompute.exemplar_view`), each window scored ``s(w) = cos(e(w), d)``:

    AUC = ( Σ_{p∈P} Σ_{q∈Q} [s(p) > s(q)] + ½·[s(p) = s(q)] ) / (|P|·|Q|)

the probability that a random activating window outranks a random other one (0.5 is
chance). It is None when ``P`` or ``Q`` is empty. The corpus windows are embedded once
(their whole decoded text, :func:`cache.embedder.embed`), so scoring every description is
a matrix product. It reads no activation value and needs no LLM; it measures whether the
description names the *context* a neuron fires in, not which token.

**Span scorer** (``embedding-span-auc-v1``): the same AUC on 16-token spans instead of whole
windows. Every window is cut into spans of :data:`SPAN_LEN` tokens every :data:`SPAN_STRIDE`
tokens from the first scored position (:func:`span_starts`; 7 spans of a 64-token window), each
embedded once. A held-out top window is represented by the span whose centre is nearest its
peak (so the span holds the peak and, away from the window's ends, at least 4 tokens on each side), and every span of the
held-out random windows is a negative. A 64-token window's embedding is mostly its topic; a
span is mostly the text around the token the neuron fires on, which is what a description
names first (delphi's examples are 32-token contexts for the same reason). Both scorers are
stored, side by side.
"""

from __future__ import annotations

import numpy as np

SCORER_ID = "embedding-auc-v1"
SCORER_VERSION = "1"
SCORER_DESCRIPTION = ("AUC with which the description's embedding ranks the neuron's held-out top windows above "
                      "held-out random windows (0.5 = chance)")
SPAN_SCORER_ID = "embedding-span-auc-v1"
SPAN_SCORER_VERSION = "1"
SPAN_SCORER_DESCRIPTION = ("AUC with which the description's embedding ranks the 16-token span around the peak of "
                           "each held-out top window above every 16-token span of the held-out random windows "
                           "(0.5 = chance)")
SPAN_LEN, SPAN_STRIDE = 16, 8


def span_starts(seq_len: int, skip_prefix: int = 1, length: int = SPAN_LEN, stride: int = SPAN_STRIDE) -> list[int]:
    """First positions of a window's spans: every ``stride`` from ``skip_prefix``, plus one
    ending at the window's end (the sink position is in no span)."""
    last = max(seq_len - length, skip_prefix)
    starts = list(range(skip_prefix, last + 1, stride))
    if starts[-1] + length < seq_len:
        starts.append(seq_len - length)
    return starts


def span_texts(tokens: list[list[str]], starts: list[int], length: int = SPAN_LEN) -> list[str]:
    """Every window's spans, window by window (row ``seq × len(starts) + j`` is span ``j`` of ``seq``)."""
    return ["".join(row[a : a + length]) for row in tokens for a in starts]


def peak_span_rows(seq_ids, peaks, starts: list[int], length: int = SPAN_LEN) -> list[int]:
    """The span rows (see :func:`span_texts`) whose centre is nearest each window's peak position."""
    centres = np.asarray(starts, np.float64) + (length - 1) / 2  # the middle of positions a … a+length−1
    n = len(starts)
    return [int(s) * n + int(np.argmin(np.abs(centres - p))) for s, p in zip(seq_ids, peaks)]


def top_span_rows(windows, polarity: int, starts: list[int], skip_prefix: int = 1,
                  length: int = SPAN_LEN) -> list[int]:
    """The peak span row (:func:`peak_span_rows`) of each top exemplar of ``windows``
    (:class:`~precompute.exemplar_view.Windows`, sink removed), its peak taken in ``polarity``."""
    peaks = np.argmax(polarity * np.asarray(windows.acts[: windows.n_top]), axis=1) + skip_prefix
    return peak_span_rows(windows.seq_ids[: windows.n_top], peaks.tolist(), starts, length)


def all_span_rows(seq_ids, starts: list[int]) -> list[int]:
    n = len(starts)
    return [int(s) * n + j for s in seq_ids for j in range(n)]


def auc_rows(pos: np.ndarray, neg: np.ndarray, pos_ok: np.ndarray | None = None,
             neg_ok: np.ndarray | None = None) -> np.ndarray:
    """Per row, the AUC of ``pos`` [n, P] against ``neg`` [n, Q] (ties count ½); masks mark the
    valid entries. float64 [n], NaN where a row has no valid positive or negative."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    pos_ok = np.ones(pos.shape, bool) if pos_ok is None else np.asarray(pos_ok, bool)
    neg_ok = np.ones(neg.shape, bool) if neg_ok is None else np.asarray(neg_ok, bool)
    d = pos[:, :, None] - neg[:, None, :]  # [n, P, Q]
    ok = pos_ok[:, :, None] & neg_ok[:, None, :]
    wins = ((d > 0) + 0.5 * (d == 0)) * ok
    pairs = ok.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins.sum(axis=(1, 2)) / pairs, np.nan)


def score_keys(desc_vecs: np.ndarray, pos_ids: list[list[int]], neg_ids: list[int],
               window_vecs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """AUC per description: ``desc_vecs`` [n, d] (unit rows), its held-out top windows' sequence
    ids, the shared held-out random ids, ``window_vecs`` [S, d] (unit rows). float64 [n].

    Rows go ``chunk`` at a time: the gathered window vectors are [rows, P, d] floats (440 MB for
    one layer of 14,336 neurons × 2 polarities at once), the same result in bounded memory."""
    if len(desc_vecs) > chunk:
        return np.concatenate([score_keys(desc_vecs[a : a + chunk], pos_ids[a : a + chunk], neg_ids, window_vecs, chunk)
                               for a in range(0, len(desc_vecs), chunk)])
    n = len(desc_vecs)
    width = max((len(p) for p in pos_ids), default=0)
    ids = np.zeros((n, max(width, 1)), np.int64)
    ok = np.zeros((n, max(width, 1)), bool)
    for i, p in enumerate(pos_ids):
        ids[i, : len(p)] = p
        ok[i, : len(p)] = True
    d = np.asarray(desc_vecs, np.float32)
    pos = np.einsum("npd,nd->np", window_vecs[ids], d)  # [n, P]
    neg = d @ np.asarray(window_vecs[neg_ids], np.float32).T if len(neg_ids) else np.zeros((n, 0))  # [n, Q]
    return auc_rows(pos, neg, ok, None)


def score_span_keys(desc_vecs: np.ndarray, windows: list, polarities: list[int], neg_ids: list[int],
                    span_vecs: np.ndarray, starts: list[int], skip_prefix: int = 1,
                    length: int = SPAN_LEN) -> np.ndarray:
    """The span scorer's AUC per description: ``windows`` each key's held-out
    :class:`~precompute.exemplar_view.Windows` (top exemplars first, sink removed), its
    polarity, the shared held-out random sequence ids, ``span_vecs`` [S·len(starts), d]
    (unit rows, :func:`span_texts` order). float64 [n]."""
    pos = [top_span_rows(w, pol, starts, skip_prefix, length) for w, pol in zip(windows, polarities)]
    return score_keys(desc_vecs, pos, all_span_rows(neg_ids, starts), span_vecs)


def prefer_bare(full_vecs: np.ndarray, bare_vecs: np.ndarray, train_windows: list, polarities: list[int],
                neg_ids: list[int], span_vecs: np.ndarray, starts: list[int], skip_prefix: int = 1) -> np.ndarray:
    """bool [n]: whether each description's bare summary (tokens only) beats its full summary on
    the span AUC of its *train* windows (``train_windows``: train top exemplars; ``neg_ids``: the
    train random sequences). Ties and undefined AUCs keep the full form. Held-out windows are
    never read, so held-out scores of the chosen form stay held out."""
    args = (train_windows, polarities, neg_ids, span_vecs, starts, skip_prefix)
    auc_full = np.nan_to_num(score_span_keys(full_vecs, *args), nan=-1.0)
    auc_bare = np.nan_to_num(score_span_keys(bare_vecs, *args), nan=-1.0)
    return auc_bare > auc_full
