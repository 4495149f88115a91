"""Statistics for steering experiments: intervals that never collapse, paired tests on pairs, a null.

Every experiment scores the same items under several conditions, so a condition is a vector
``x[i]`` of per-item scores (1 correct, 0 wrong, ½ tie) and items come in **clusters** (the
two orders of one question, ``pair`` ids): the cluster, not the item, is the unit of resampling.

Provides:

* :func:`wilson_ci`: the Wilson score interval for a proportion; :func:`accuracy_summary` applies it
  with the number of *clusters* as the sample size (conservative when the orders agree less than
  perfectly; exact when they always agree), so 100% gives ``[n/(n+z²), 1]``, never ``[1, 1]``;
* :func:`cluster_bootstrap` / :func:`cluster_bootstrap_ci`: percentile bootstrap resampling whole
  clusters (an accuracy, or a paired difference ``mean(a − b)``);
* :func:`paired_sign_test`: McNemar's exact test on clusters: per cluster the mean difference
  ``d = mean(a − b)``; under H0 each non-zero ``d`` is positive or negative with probability ½,
  ``p = binomtest(#{d > 0}, #{d ≠ 0}, ½)`` two-sided. With one binary item per cluster this is
  exactly McNemar's test; :func:`mcnemar_exact` is that special case;
* :func:`holm`: Holm's step-down adjustment of a family of p-values;
* :func:`null_position`: where an effect falls in a null distribution of control effects
  (empirical percentile and p-values, and a t-based prediction p-value for small nulls).

Everything is seeded: the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_BOOT = 4000


def _vector(x, name: str = "values") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _z(level: float) -> float:
    from scipy.stats import norm

    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    return float(norm.ppf(1 - (1 - level) / 2))


def wilson_ci(successes: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (fractional successes allowed)::

        (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)

    Strictly inside (0, 1) unless p̂ is 0 or 1, where one end is 0 or 1 and the other is not.
    NaNs when ``n`` is 0.
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    z = _z(level)
    p = min(1.0, max(0.0, successes / n))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if p == 0 else lo, 1.0 if p == 1 else hi)  # exact ends where rounding would miss them


def _cluster_index(clusters, n: int) -> tuple[np.ndarray, int]:
    """(cluster number per item 0..C−1, C); every item its own cluster when ``clusters`` is None."""
    if clusters is None:
        return np.arange(n), n
    c = np.asarray(clusters)
    if c.shape != (n,):
        raise ValueError("clusters must give one id per item")
    _, inv = np.unique(c, return_inverse=True)
    return inv, int(inv.max()) + 1 if n else 0


def cluster_bootstrap(x, clusters=None, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of ``mean(x)``, resampling whole clusters: float64 [n_boot].

    Replicate ``b`` draws ``C`` clusters uniformly with replacement
    (``numpy.random.default_rng(seed)``) and takes the mean over all their items.
    """
    x = _vector(x)
    if len(x) == 0:
        return np.full(n_boot, np.nan)
    inv, n_c = _cluster_index(clusters, len(x))
    sums = np.bincount(inv, weights=x, minlength=n_c)  # [C]
    sizes = np.bincount(inv, minlength=n_c).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n_c, size=(n_boot, n_c))  # [n_boot, C]
    return sums[pick].sum(axis=1) / sizes[pick].sum(axis=1)


def cluster_bootstrap_ci(x, clusters=None, level: float = 0.95, n_boot: int = DEFAULT_BOOT,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile interval ``(q_{α/2}, q_{1−α/2})`` of :func:`cluster_bootstrap` (α = 1 − level)."""
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    means = cluster_bootstrap(x, clusters, n_boot, seed)
    if np.isnan(means).all():
        return (float("nan"), float("nan"))
    alpha = 1.0 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def paired_sign_test(a, b, clusters=None) -> dict:
    """McNemar's exact test on clusters (module docstring): ``{"a_better", "b_better", "p"}``,
    counting clusters whose mean difference is positive / negative. ``p = 1`` when none differ."""
    from scipy.stats import binomtest

    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same shape")
    inv, n_c = _cluster_index(clusters, len(a))
    d = np.bincount(inv, weights=a - b, minlength=n_c)
    pos, neg = int(np.sum(d > 1e-12)), int(np.sum(d < -1e-12))
    p = 1.0 if pos + neg == 0 else float(binomtest(pos, pos + neg, 0.5).pvalue)
    return {"a_better": pos, "b_better": neg, "p": p}


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact (binomial) test for two paired binary vectors: ``{"a_only", "b_only", "p"}``
    with ``a_only`` = items only ``a`` got right. :func:`paired_sign_test` with one item per cluster."""
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same shape")
    r = paired_sign_test(a.astype(float), b.astype(float))
    return {"a_only": r["a_better"], "b_only": r["b_better"], "p": r["p"]}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order): sort ascending, ``p_(i) · (m − i + 1)``,
    made monotone by a running maximum and capped at 1. NaNs are left out and stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, p[i] * (m - rank)))
        out[i] = running
    return out.tolist()


def null_position(effect: float, null) -> dict:
    """Where ``effect`` falls among control effects ``null`` (one per random control).

    * ``percentile``: ``100 · (#{null < e} + ½ #{null = e}) / N``;
    * ``p_empirical``: one-sided in the direction of ``e`` from the null's median,
      ``(1 + #{null at least as extreme}) / (N + 1)`` (its floor is ``1/(N+1)``);
    * ``beyond_all``: ``e`` lies outside the whole null range;
    * ``p_t``: two-sided prediction p-value, ``t = (e − mean)/(sd·sqrt(1 + 1/N))`` with
      ``N − 1`` degrees of freedom (assumes roughly normal controls; resolves below ``1/(N+1)``).
    """
    from scipy.stats import t as student_t

    null = _vector(null, "null")
    n = len(null)
    if n == 0:
        return {"n": 0, "percentile": float("nan"), "p_empirical": float("nan"), "p_t": float("nan"),
                "beyond_all": False, "null_mean": float("nan"), "null_sd": float("nan"),
                "null_lo": float("nan"), "null_hi": float("nan")}
    e = float(effect)
    pct = 100.0 * (np.sum(null < e) + 0.5 * np.sum(null == e)) / n
    upward = e >= float(np.median(null))
    extreme = np.sum(null >= e) if upward else np.sum(null <= e)
    p_emp = float((1 + extreme) / (n + 1))
    mean = float(np.mean(null))
    sd = float(np.std(null, ddof=1)) if n > 1 else float("nan")
    if n > 1 and sd > 0:
        t = (e - mean) / (sd * math.sqrt(1 + 1 / n))
        p_t = float(2 * student_t.sf(abs(t), n - 1))
    elif n > 1:
        p_t = 1.0 if e == mean else 0.0
    else:
        p_t = float("nan")
    return {"n": n, "percentile": float(pct), "p_empirical": p_emp, "p_t": p_t,
            "beyond_all": bool(e > null.max() or e < null.min()), "null_mean": mean, "null_sd": sd,
            "null_lo": float(np.quantile(null, 0.05)), "null_hi": float(np.quantile(null, 0.95))}


def accuracy_summary(correct, clusters=None, level: float = 0.95, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> dict:
    """``{"acc", "lo", "hi", "boot_lo", "boot_hi", "n", "n_clusters"}`` for per-item scores in [0, 1].

    ``lo``/``hi``: :func:`wilson_ci` with the cluster count as ``n``; ``boot_*``: the cluster bootstrap.
    """
    x = _vector(correct)
    _, n_c = _cluster_index(clusters, len(x))
    acc = float(x.mean()) if len(x) else float("nan")
    lo, hi = wilson_ci(acc * n_c, n_c, level) if len(x) else (float("nan"), float("nan"))
    blo, bhi = cluster_bootstrap_ci(x, clusters, level, n_boot, seed)
    return {"acc": acc, "lo": lo, "hi": hi, "boot_lo": blo, "boot_hi": bhi, "n": int(len(x)), "n_clusters": n_c}
