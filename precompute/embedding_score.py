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
"""

from __future__ import annotations

import numpy as np

SCORER_ID = "embedding-auc-v1"
SCORER_VERSION = "1"
SCORER_DESCRIPTION = ("AUC with which the description's embedding ranks the neuron's held-out top windows above "
                      "held-out random windows (0.5 = chance)")


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
