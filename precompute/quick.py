"""The quick partial database that ``make demo`` builds before the full one.

The full build of the embedded model takes about 12 minutes on 2 idle cores with bf16 instructions,
about an hour in fp32 without them (most of it the activation pass over 8,192 sequences and the
embedding of the windows and summaries). So the background build
(:mod:`precompute.background`) first writes a **partial** database from a small slice of the corpus
with every fifth layer described, then goes on with the full build in the same build process (one lock,
one chain; each stage in a child process of its own):

- the partial database is ``<db>.partial.duckdb`` (:func:`cache.paths.partial_path`) with its own
  build folder ``<build folder>-partial`` (:func:`partial_root`), e.g.
  ``data/smollm2-135m-instruct.partial.duckdb`` and ``data/build/smollm2-135m-instruct-partial``;
- its ``meta`` says ``partial = true``; ``described_layers`` and ``n_sequences`` say what it covers;
- the dashboard opens it while the full database is missing (:func:`cache.paths.resolve_db_path`)
  and switches to the full one when it lands; the chain then deletes the partial files;
- a killed chain resumes: the partial part is skipped when its database exists.

Its settings are :func:`quick_config`: the full build's settings with ``--n-sequences``
:data:`QUICK_N_SEQUENCES` and every :data:`QUICK_LAYER_STEP`-th of the full build's layers. Every
other knob (corpus profile and sources, seed, batch size, k, precision, explainer) is the full
build's, so the partial database is a smaller build of the same kind.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from cache.paths import partial_path

from .pipeline import Build, BuildConfig, parse_layers

# Measured on the 2-core development machine (2026-12-02, idle, each stage in its own process): 256
# sequences × 64 tokens and 6 of the embedded model's 30 layers (0, 5, …, 25) built the partial database
# in about 2 minutes: corpus 16 s, activations 21 s, exemplars 8 s, descriptions 27 s, embeddings 16 s,
# scores 9 s, write 16 s; a fresh clone showed its descriptions 192 s after `git clone`.
QUICK_N_SEQUENCES = 256
QUICK_LAYER_STEP = 5


def partial_root(root: Path) -> Path:
    """The partial build's folder next to the full build's ``root``: ``<root>-partial``."""
    root = Path(root)
    return root.with_name(f"{root.name}-partial")


def quick_layers(layers: list[int], step: int = QUICK_LAYER_STEP) -> list[int]:
    """Every ``step``-th of the full build's ``layers``, from the first: 0, 5, …, 25 of 0..29."""
    return list(layers)[:: max(1, int(step))]


def quick_config(full: BuildConfig, n_layers: int, n_sequences: int = QUICK_N_SEQUENCES,
                 layer_step: int = QUICK_LAYER_STEP) -> BuildConfig | None:
    """The quick partial build's settings for the full build ``full`` of a model with ``n_layers``
    layers, or None when it would not be smaller than the full build (a tiny corpus, one layer)."""
    from .corpus import PROFILES

    full_layers = parse_layers(full.layers, n_layers)
    layers = quick_layers(full_layers, layer_step)
    full_n = full.n_sequences or (PROFILES[full.profile].n_sequences if full.profile in PROFILES else None)
    n = int(n_sequences) if not full_n else min(int(n_sequences), int(full_n))
    if n >= (full_n or n) and len(layers) == len(full_layers):
        return None
    return replace(full, n_sequences=n, layers=",".join(map(str, layers)), db=str(partial_path(full.db_path)),
                   work_dir=str(partial_root(full.root)), partial=True)


def build_partial_then_full(full_cfg: BuildConfig, progress: bool = True, n_sequences: int = QUICK_N_SEQUENCES,
                            layer_step: int = QUICK_LAYER_STEP, until: str = "write",
                            isolate: bool = True) -> Path | None:
    """Build the quick partial database (unless it exists, or the full one does), then the full one.

    ``isolate``: each stage of both builds in a child process of its own (:meth:`Build.run`), so
    this process never loads the model and the chain's peak memory is its largest stage's; without
    it both builds share one loaded model. When the full database is written the partial database
    and its build folder are deleted: the full one supersedes them."""
    full = Build(full_cfg, progress=progress, isolate=isolate)
    quick = None
    if not full_cfg.db_path.exists():
        full.layer_list()  # a bad --layers fails now, before either build
        full.check_config()  # and conflicting settings in the full build's folder too
        quick = quick_config(full_cfg, full.model_facts()[0], n_sequences, layer_step)
        if quick is not None and not quick.db_path.exists():
            if progress:
                print(f"quick partial database first: layers {quick.layers}, {quick.n_sequences} sequences "
                      f"→ {quick.db_path}", flush=True)
            Build(quick, progress=progress, **({"isolate": True} if isolate else {"lm": full.lm})).run()
            if progress:
                print(f"partial database written: {quick.db_path}; now the full build → {full_cfg.db_path}", flush=True)
    path = full.run(until=until)
    if path is not None and path.exists():
        discard_partial(full_cfg)
    return path


def discard_partial(full_cfg: BuildConfig) -> None:
    """Delete the partial database and its build folder next to ``full_cfg``'s (the full one landed)."""
    partial_path(full_cfg.db_path).unlink(missing_ok=True)
    shutil.rmtree(partial_root(full_cfg.root), ignore_errors=True)
