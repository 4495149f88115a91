"""Where a model's neuron database lives, and the command that rebuilds it.

``db_path("embedded")`` is ``data/smollm2-135m-instruct.duckdb`` (``MONITOR_DATA_DIR``
moves ``data/``; :func:`engine.loader.data_dir`). A build writes ``<db>.duckdb.tmp`` first and renames it when done.

``engine.loader`` imports torch, so it is imported inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "embedded"


def db_path(model: str = EMBEDDED_NAME) -> Path:
    """``data_dir() / f"{model_slug(model)}.duckdb"``."""
    from engine.loader import data_dir, model_slug

    return data_dir() / f"{model_slug(model)}.duckdb"


def tmp_path(path: Path) -> Path:
    """The file a build writes before renaming it to ``path``: ``x.duckdb`` → ``x.duckdb.tmp``."""
    return Path(path).with_suffix(".duckdb.tmp")


def model_for_slug(slug: str, model_id: str | None = None) -> str:
    """The ``--model`` argument that rebuilds a database: ``embedded`` for the embedded slug,
    else the ``model_id`` recorded in its meta, else the slug itself."""
    from engine.loader import model_slug

    if slug == model_slug(EMBEDDED_NAME):
        return EMBEDDED_NAME
    return model_id or slug


def build_command(model: str) -> str:
    """The shell command that (re)builds a model's database."""
    return f"python -m precompute build --model {model}"
