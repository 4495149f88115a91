"""Reading a publisher's export files: JSON lines (plain or gzip) and JSON, with one clear error.

A corrupt or truncated file raises :class:`MonitorError` naming the file and line; nothing of
that file has been written yet (an importer parses a whole file before committing it), so the
import resumes once the file is replaced.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path

from engine.errors import MonitorError

_BATCH = re.compile(r"^batch-(\d+)\.jsonl(\.gz)?$")


def _corrupt(path: Path, what: str) -> MonitorError:
    return MonitorError(f"{path} is corrupt ({what}): download it again, or delete it, then rerun the same command "
                        "(what was imported so far is kept and the import resumes).")


def read_json_lines(path: Path) -> list[dict]:
    """Every JSON object of a ``.jsonl`` or ``.jsonl.gz`` file (blank lines skipped)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    rows, n = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise _corrupt(path, f"line {n} is not a JSON object")
                    rows.append(row)
    except (OSError, EOFError, zlib.error) as err:
        raise _corrupt(path, f"not a readable gzip file: {err}") from err
    except UnicodeDecodeError as err:
        raise _corrupt(path, f"line {n + 1} is not UTF-8") from err
    except json.JSONDecodeError as err:
        raise _corrupt(path, f"line {n} is not JSON: {err.msg}") from err
    return rows


def read_json(path: Path) -> dict:
    """One JSON object from a file (the first non-blank line of a ``.jsonl``)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = read_json_lines(path)
        if not rows:
            raise _corrupt(path, "it is empty")
        return rows[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise _corrupt(path, "not UTF-8") from err
    except json.JSONDecodeError as err:
        raise _corrupt(path, f"not JSON: {err.msg} at line {err.lineno}") from err
    if not isinstance(data, dict):
        raise _corrupt(path, "not a JSON object")
    return data


def batch_files(folder: Path) -> list[Path]:
    """``batch-N.jsonl[.gz]`` files of ``folder`` in batch order (N numerically)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _BATCH.match(p.name))]
    return [p for _, p in sorted(found)]


def numbered(folder: Path, suffix: str = "") -> list[tuple[int, Path]]:
    """``(n, path)`` of the entries of ``folder`` named ``<n><suffix>`` (n a whole number), by n."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        stem = p.name[: -len(suffix)] if suffix and p.name.endswith(suffix) else (None if suffix else p.name)
        if stem is not None and stem.isdigit():
            out.append((int(stem), p))
    return sorted(out)
