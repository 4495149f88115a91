"""Rank a trace's neurons for display: quantile normalisation, activation and attribution rows, heatmaps.

No Streamlit here: these are pure functions of a trace and the database's quantile tables, so
they are easy to test and the pages only draw what they return.

**Activation mode.** A neuron's value at a token is normalised by its extreme quantile from
the database::

    n[l,t,i] = a[l,t,i] / s⁺[l,i]   if a ≥ 0,     s⁺ = Q(1 − 1e-5)
    n[l,t,i] = a[l,t,i] / s⁻[l,i]   if a < 0,     s⁻ = −Q(1e-5)   (so n keeps a's sign)

so |n| ≥ 1 means "at or beyond the most extreme quantile the database has". One row per
neuron, at the token where |n| is largest (token 0, the attention sink, left out by default).

**Attribution mode.** The top-k (layer, token, neuron) cells by |attribution|, each with the
polarity of its activation (which description applies).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

ROW_COLUMNS = ["layer", "neuron", "polarity", "token_index", "value", "activation"]


def quantile_scales(q_high: np.ndarray, q_low: np.ndarray, rel_floor: float = 0.05,
                    abs_floor: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Divisors (s⁺, s⁻), both positive float32 [layers, neurons], from the quantile tables.

    A neuron whose quantile is zero, tiny or of the wrong sign (it never went that way on the
    corpus) would blow a live value up to thousands; its divisor is floored at
    ``max(abs_floor, rel_floor × median_l)``, where ``median_l`` is the median divisor of its
    layer. A neuron the database lacks (NaN) gets ``inf``: its normalised value is 0.
    """
    out = []
    for table in (np.asarray(q_high, np.float32), -np.asarray(q_low, np.float32)):
        s = table.copy()  # [layers, neurons]
        known = np.isfinite(s)
        pos = np.where(known & (s > 0), s, np.nan)
        with np.errstate(all="ignore"):
            med = np.nanmedian(pos, axis=1) if pos.size else np.zeros(0)
        med = np.where(np.isfinite(med), med, 0.0)
        floor = np.maximum(abs_floor, rel_floor * med)[:, None]  # [layers, 1]
        s = np.where(known, np.maximum(s, floor), np.inf).astype(np.float32)
        out.append(s)
    return out[0], out[1]


def normalise(acts: torch.Tensor, scales: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor:
    """n [layers, tokens, neurons] (see the module docstring); the raw values when ``scales`` is None."""
    a = acts.float()
    if scales is None:
        return a
    pos = torch.from_numpy(np.ascontiguousarray(scales[0]))[:, None, :]  # [layers, 1, neurons]
    neg = torch.from_numpy(np.ascontiguousarray(scales[1]))[:, None, :]
    return torch.where(a >= 0, a / pos, a / neg)


def _sink_mask(n_tokens: int, skip_sink: bool) -> torch.Tensor:
    keep = torch.ones(n_tokens, dtype=torch.bool)
    if skip_sink and n_tokens > 1:
        keep[0] = False
    return keep


def neuron_extremes(norm: torch.Tensor, skip_sink: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, the token where |n| is largest and n there: (token [L, N] int, value [L, N] float)."""
    keep = _sink_mask(norm.shape[1], skip_sink)
    mag = norm.abs().masked_fill(~keep[None, :, None], -1.0)
    tok = mag.argmax(dim=1)  # [layers, neurons]
    val = norm.gather(1, tok[:, None, :])[:, 0, :]
    return tok.numpy(), val.numpy()


def activation_rows(norm: torch.Tensor, acts: torch.Tensor, threshold: float, skip_sink: bool = True,
                    limit: int = 1000) -> tuple[pd.DataFrame, int]:
    """One row per neuron with |n| ≥ ``threshold`` at its most extreme token, strongest first.

    Returns (rows with :data:`ROW_COLUMNS`, how many neurons passed before ``limit``). ``value``
    is the normalised value, ``activation`` the raw one, ``polarity`` its sign (±1).
    """
    tok, val = neuron_extremes(norm, skip_sink)
    hit = np.abs(val) >= threshold
    layer, neuron = np.nonzero(hit)
    order = np.argsort(-np.abs(val[layer, neuron]), kind="stable")
    total = len(order)
    layer, neuron = layer[order[:limit]], neuron[order[:limit]]
    t = tok[layer, neuron]
    v = val[layer, neuron]
    raw = acts[torch.from_numpy(layer), torch.from_numpy(t), torch.from_numpy(neuron)].numpy() if len(layer) else np.zeros(0)
    df = pd.DataFrame({
        "layer": layer.astype(np.int64), "neuron": neuron.astype(np.int64),
        "polarity": np.where(v >= 0, 1, -1).astype(np.int64), "token_index": t.astype(np.int64),
        "value": v.astype(np.float64), "activation": raw.astype(np.float64),
    })
    return df, total


def attribution_values(trace, kind: str = "logprob") -> torch.Tensor:
    """[layers, tokens, neurons]: ``a · ∂log p/∂a`` or, for ``prob``, that × p(target) (chain rule)."""
    if trace.attributions is None:
        raise ValueError("the trace has no attribution")
    attr = trace.attributions
    if kind == "prob":
        attr = attr * float(trace.target_prob)
    return attr


def attribution_rows(attr: torch.Tensor, acts: torch.Tensor, k: int = 1000, skip_sink: bool = True) -> pd.DataFrame:
    """The top-``k`` (layer, token, neuron) cells by |attribution|; columns :data:`ROW_COLUMNS`
    (``value`` = attribution, ``activation`` = the raw activation whose sign is the polarity)."""
    a = attr.float()
    keep = _sink_mask(a.shape[1], skip_sink)
    flat = a.masked_fill(~keep[None, :, None], 0.0).reshape(-1)
    k = min(int(k), flat.numel())
    idx = torch.topk(flat.abs(), k).indices  # [k]
    n_tok, n_neu = a.shape[1], a.shape[2]
    layer = idx // (n_tok * n_neu)
    tok = (idx // n_neu) % n_tok
    neuron = idx % n_neu
    raw = acts[layer, tok, neuron].numpy()
    df = pd.DataFrame({
        "layer": layer.numpy().astype(np.int64), "neuron": neuron.numpy().astype(np.int64),
        "polarity": np.where(raw >= 0, 1, -1).astype(np.int64), "token_index": tok.numpy().astype(np.int64),
        "value": flat[idx].numpy().astype(np.float64), "activation": raw.astype(np.float64),
    })
    return df[df["value"] != 0].reset_index(drop=True)


def activation_heatmap(norm: torch.Tensor, threshold: float, skip_sink: bool = True) -> pd.DataFrame:
    """Long table (layer, token_index, sum_abs, count): per layer and token, Σ|n| and the number
    of neurons with |n| ≥ ``threshold`` (Σ over those neurons only). Token 0 dropped when skipped."""
    mag = norm.abs()
    over = mag >= threshold
    sum_abs = (mag * over).sum(-1)  # [layers, tokens]
    count = over.sum(-1)
    return _long(sum_abs, count, _sink_mask(norm.shape[1], skip_sink))


def attribution_heatmap(attr: torch.Tensor, rows: pd.DataFrame, skip_sink: bool = True) -> pd.DataFrame:
    """Long table (layer, token_index, sum_abs, count): Σ|attribution| over all neurons, and how
    many of the top cells (``rows``) fall in each (layer, token)."""
    sum_abs = attr.float().abs().sum(-1)  # [layers, tokens]
    count = torch.zeros_like(sum_abs, dtype=torch.long)
    if len(rows):
        li = torch.as_tensor(rows["layer"].to_numpy(copy=True))
        ti = torch.as_tensor(rows["token_index"].to_numpy(copy=True))
        count.index_put_((li, ti), torch.ones(len(rows), dtype=torch.long), accumulate=True)
    return _long(sum_abs, count, _sink_mask(attr.shape[1], skip_sink))


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
