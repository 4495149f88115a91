"""Where a model's neuron database lives, and the command that rebuilds it.

``db_path("embedded")`` is ``data/smollm2-135m-instruct.duckdb`` (``MONITOR_DATA_DIR``
moves ``data/``; :func:`engine.loader.data_dir`). A build writes ``<db>.duckdb.tmp`` first and renames it when done.

``make demo`` builds a quick partial database first (``x.partial.duckdb`` next to ``x.duckdb``;
see :mod:`precompute.quick`): :func:`resolve_db_path` opens the full file when it exists, else
that partial one.

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


def partial_path(path: Path) -> Path:
    """The quick partial database built before ``path``: ``x.duckdb`` → ``x.partial.duckdb``."""
    path = Path(path)
    stem = path.name[: -len(".duckdb")] if path.name.endswith(".duckdb") else path.name
    return path.with_name(f"{stem}.partial.duckdb")


def resolve_db_path(path: Path) -> Path:
    """The database to open for ``path``: ``path`` itself when it exists, else its quick partial
    database (:func:`partial_path`) when that exists, else ``path`` (whose absence the opener reports)."""
    path = Path(path)
    if path.exists():
        return path
    partial = partial_path(path)
    return partial if partial.is_file() else path


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
