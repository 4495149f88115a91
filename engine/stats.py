"""Small, exact statistics for steering experiments: bootstrap intervals and paired tests.

Every experiment scores the *same* prompts under several conditions, so each condition is
a boolean vector ``correct[i]`` over prompts ``i = 0..n-1`` and conditions are compared
pairwise on the same prompts:

* :func:`bootstrap_ci`: percentile bootstrap of the accuracy ``mean(correct)``.
* :func:`paired_bootstrap_diff_ci`: percentile bootstrap of ``mean(a) − mean(b)``,
  resampling prompts (pairs) together.
* :func:`mcnemar_exact`: McNemar's exact test on the discordant pairs.

Everything is seeded: the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BOOT = 4000


def _bool_vector(x, name: str = "values") -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a.astype(np.float64)


def bootstrap_means(x, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of ``mean(x)``: float64 [n_boot].

    Replicate ``b`` is ``mean(x[idx_b])`` with ``idx_b`` drawn uniformly with replacement
    (``n`` draws from ``0..n-1``) by ``numpy.random.default_rng(seed)``.
    """
    x = _bool_vector(x)
    if len(x) == 0:
        return np.full(n_boot, np.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))  # [n_boot, n]
    return x[idx].mean(axis=1)


def bootstrap_ci(x, level: float = 0.95, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (e.g. 0/1 correctness).

    ``(lo, hi) = (quantile_{α/2}, quantile_{1−α/2})`` of :func:`bootstrap_means`, with
    ``α = 1 − level``, widened if needed so it contains ``mean(x)`` (for 0/1 data the
    bootstrap means straddle the mean anyway unless all values are equal, when lo = hi =
    mean). Its width shrinks like ``1/√n``. NaNs for empty input.
    """
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    means = bootstrap_means(x, n_boot, seed)
    if np.isnan(means).all():
        return (float("nan"), float("nan"))
    alpha = 1.0 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    m = float(np.mean(_bool_vector(x)))
    return (float(min(lo, m)), float(max(hi, m)))


def paired_bootstrap_diff_ci(a, b, level: float = 0.95, n_boot: int = DEFAULT_BOOT,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) − mean(b)`` for paired samples.

    The same resampled indices are used for ``a`` and ``b``, i.e. this is the bootstrap of
    ``mean(a − b)``; ``b`` may be fractional (e.g. the mean correctness over control seeds).
    """
    a, b = _bool_vector(a, "a"), _bool_vector(b, "b")
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    return bootstrap_ci(a - b, level, n_boot, seed)


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact (binomial) test that conditions ``a`` and ``b`` are equally accurate.

    Over prompts where they disagree, ``n01`` = b right and a wrong, ``n10`` = a right and b
    wrong. Under H0 each discordant prompt is a fair coin, so
    ``p = P(|Binomial(n01 + n10, ½) − (n01 + n10)/2| ≥ |n10 − (n01 + n10)/2|)``, computed
    with ``scipy.stats.binomtest(n10, n01 + n10, 0.5)`` (two-sided). ``p = 1`` when there
    are no discordant prompts.
    """
    from scipy.stats import binomtest

    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same shape")
    n10 = int(np.sum(a & ~b))
    n01 = int(np.sum(~a & b))
    p = 1.0 if n10 + n01 == 0 else float(binomtest(n10, n10 + n01, 0.5).pvalue)
    return {"a_only": n10, "b_only": n01, "p": p}


def accuracy_summary(correct, level: float = 0.95, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> dict:
    """``{"acc", "lo", "hi", "n"}`` for a 0/1 vector (NaNs for none)."""
    x = _bool_vector(correct)
    lo, hi = bootstrap_ci(x, level, n_boot, seed)
    return {"acc": float(x.mean()) if len(x) else float("nan"), "lo": lo, "hi": hi, "n": int(len(x))}
