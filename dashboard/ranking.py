"""Rank a trace's neurons for display: activation and attribution rows, heatmaps, description joins.

No Streamlit here: pure functions of a trace (through :class:`engine.trace.Trace`'s methods, which
work for a whole trace and a compact one alike), so they are easy to test and the pages only
draw what they return. Normalisation itself (the quantile divisors,
their floor, ``n = a ÷ extreme quantile``) is :mod:`engine.activation_view`'s.

**Activation mode.** One row per neuron with |n| ≥ the threshold, at the token where |n| is
largest (token 0, the attention sink, left out by default).

**Attribution mode.** The top-k (layer, token, neuron) cells by |attribution|, each with the
polarity of its activation (which description applies).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from engine.activation_view import SINK, normalise_layer, token_mask

ROW_COLUMNS = ["layer", "neuron", "polarity", "token_index", "value", "activation"]


def activation_rows(trace, view, threshold: float, skip_sink: bool = True,
                    limit: int = 1000) -> tuple[pd.DataFrame, int]:
    """One row per neuron with |n| ≥ ``threshold`` at its most extreme token, strongest first
    (:meth:`engine.trace.Trace.salient`; ``view`` an ActivationView or None for raw values).

    Returns (rows with :data:`ROW_COLUMNS`, how many neurons passed before ``limit``). ``value``
    is the normalised value, ``activation`` the raw one, ``polarity`` its sign (±1).
    """
    sal = trace.salient(view, threshold, skip_sink, limit)
    layer, neuron, t = sal.layer, sal.neuron, sal.token
    raw = trace.cells("activations", layer, t, neuron) if len(sal) else np.zeros(0)
    df = pd.DataFrame({
        "layer": layer, "neuron": neuron, "polarity": sal.polarity, "token_index": t,
        "value": sal.value, "activation": raw.astype(np.float64),
    })
    return df, sal.total


def attribution_scale(trace, kind: str = "logprob") -> float:
    """What the trace's ``a · ∂log p/∂a`` is multiplied by: 1, or p(target) for ``prob`` (chain rule)."""
    if not trace.has_attribution:
        raise ValueError("the trace has no attribution")
    return float(trace.target_prob) if kind == "prob" else 1.0


def attribution_rows(trace, kind: str = "logprob", k: int = 1000, skip_sink: bool = True) -> pd.DataFrame:
    """The top-``k`` (layer, token, neuron) cells by |attribution|; columns :data:`ROW_COLUMNS`
    (``value`` = attribution, ``activation`` = the raw activation whose sign is the polarity)."""
    scale = attribution_scale(trace, kind)
    cells = trace.top_cells("attributions", k, (SINK,) if skip_sink else ())
    layer = np.array([c["layer"] for c in cells], np.int64)
    tok = np.array([c["token_index"] for c in cells], np.int64)
    neuron = np.array([c["neuron"] for c in cells], np.int64)
    value = np.array([c["value"] for c in cells], np.float32) * np.float32(scale)
    raw = trace.cells("activations", layer, tok, neuron) if len(cells) else np.zeros(0, np.float32)
    df = pd.DataFrame({
        "layer": layer, "neuron": neuron, "polarity": np.where(raw >= 0, 1, -1).astype(np.int64), "token_index": tok,
        "value": value.astype(np.float64), "activation": raw.astype(np.float64),
    })
    return df[df["value"] != 0].reset_index(drop=True)


def activation_heatmap(trace, view, threshold: float, skip_sink: bool = True) -> pd.DataFrame:
    """Long table (layer, token_index, sum_abs, count): per layer and token, Σ|n| and the number
    of neurons with |n| ≥ ``threshold`` (Σ over those neurons only). Token 0 dropped when skipped.
    One layer at a time (:meth:`engine.trace.Trace.map_layers`)."""
    def reduce(layer: int, acts: torch.Tensor):
        mag = normalise_layer(acts, view, layer).abs()
        over = mag >= threshold
        return (mag * over).sum(-1), over.sum(-1)

    got = trace.map_layers("activations", reduce)
    sum_abs = torch.stack([got[l][0] for l in sorted(got)])  # [layers, tokens]
    count = torch.stack([got[l][1] for l in sorted(got)])
    return _long(sum_abs, count, token_mask(sum_abs.shape[1], (SINK,) if skip_sink else ()))


def attribution_heatmap(trace, kind: str, rows: pd.DataFrame, skip_sink: bool = True) -> pd.DataFrame:
    """Long table (layer, token_index, sum_abs, count): Σ|attribution| over all neurons, and how
    many of the top cells (``rows``) fall in each (layer, token)."""
    sum_abs = trace.abs_sums("attributions").float() * attribution_scale(trace, kind)  # [layers, tokens]
    count = torch.zeros_like(sum_abs, dtype=torch.long)
    if len(rows):
        li = torch.as_tensor(rows["layer"].to_numpy(copy=True))
        ti = torch.as_tensor(rows["token_index"].to_numpy(copy=True))
        count.index_put_((li, ti), torch.ones(len(rows), dtype=torch.long), accumulate=True)
    return _long(sum_abs, count, token_mask(sum_abs.shape[1], (SINK,) if skip_sink else ()))


def _long(sum_abs: torch.Tensor, count: torch.Tensor, keep: torch.Tensor) -> pd.DataFrame:
    n_layers, n_tokens = sum_abs.shape
    layer, tok = np.meshgrid(np.arange(n_layers), np.arange(n_tokens), indexing="ij")
    df = pd.DataFrame({"layer": layer.ravel(), "token_index": tok.ravel(),
                       "sum_abs": sum_abs.numpy().ravel().astype(np.float64),
                       "count": count.numpy().ravel().astype(np.int64)})
    return df[keep.numpy()[df["token_index"].to_numpy()]].reset_index(drop=True)


def join_descriptions(rows: pd.DataFrame, desc: pd.DataFrame) -> pd.DataFrame:
    """Add ``description``, ``summary`` and ``score`` of each row's polarity (``desc`` as
    ``NeuronDB.descriptions_for``, aligned with ``rows``)."""
    out = rows.reset_index(drop=True).copy()
    pos = out["polarity"].to_numpy() > 0
    for col in ("description", "summary", "score"):
        p = desc[f"{col}_pos"].to_numpy(object)
        n = desc[f"{col}_neg"].to_numpy(object)
        out[col] = np.where(pos, p, n) if len(out) else np.array([], dtype=object)
    out["score"] = pd.to_numeric(out["score"], errors="coerce").astype("float64")
    return out


def keyword_filter(df: pd.DataFrame, text: str, columns=("description", "summary", "token")) -> pd.DataFrame:
    """Rows where any of ``columns`` contains ``text`` (case-insensitive, literal)."""
    text = (text or "").strip().lower()
    if not text or df.empty:
        return df
    mask = np.zeros(len(df), dtype=bool)
    for col in columns:
        if col in df:
            mask |= df[col].fillna("").astype(str).str.lower().str.contains(text, regex=False).to_numpy()
    return df[mask]
