"""Compact per-token activations of exemplars: int8 codes and one scale per row.

    scale = max_t |act_t|            (0 for an all-zero row)
    code_t = round(127 · act_t / scale)  ∈ [-127, 127]
    act_t ≈ code_t · scale / 127     (error ≤ scale / 254 per token)

A hosting bundle (:mod:`cache.bundle`) stores description embeddings the same way, without the
scale: search only needs directions, so ``vec ≈ codes / ‖codes‖`` (:func:`decode_unit_rows`).
"""

from __future__ import annotations

import numpy as np


def encode_acts(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """acts float [n, T] (or [T]) → (codes int8 [n, T], scale float32 [n]) as in the module docstring."""
    a = np.asarray(acts, dtype=np.float32)
    single = a.ndim == 1
    a = np.atleast_2d(a)  # [n, T]
    if not np.all(np.isfinite(a)):
        raise ValueError("activations must be finite to encode as int8")
    scale = np.abs(a).max(axis=1) if a.shape[1] else np.zeros(a.shape[0], np.float32)  # [n]
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    codes = np.clip(np.rint(a / safe * 127.0), -127, 127).astype(np.int8)  # [n, T]
    if single:
        return codes[0], scale[:1].astype(np.float32)
    return codes, scale.astype(np.float32)


def decode_acts(codes: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """codes int8 [T] or [n, T], scale scalar or [n] → float32 activations ``code · scale / 127``."""
    c = np.asarray(codes, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    if c.ndim == 2 and s.ndim == 1:
        s = s[:, None]
    return c * (s / np.float32(127.0))


def encode_unit_rows(vecs: np.ndarray) -> np.ndarray:
    """float [n, d] → int8 codes [n, d], ``round(127 · v / max|v|)`` per row (direction kept)."""
    codes, _ = encode_acts(np.atleast_2d(vecs))
    return codes


def decode_unit_rows(codes: np.ndarray) -> np.ndarray:
    """int8 (or float) [n, d] or [d] → float32 rows of unit length, ``c / ‖c‖`` (zero rows stay zero)."""
    c = np.asarray(codes, dtype=np.float32)
    norm = np.linalg.norm(c, axis=-1, keepdims=True)
    return c / np.where(norm > 0, norm, 1.0)
