"""Command line for the neuron database.

    python -m cache search "Bible verses" --k 20 [--layers 0-10] [--polarity 1] [--min-score 0.2] [--scorer S] [--why] [--rank behaviour|summary] [--json]
    python -m cache keyword "chapter" --k 50 [--json]
    python -m cache neuron 12 345 [--json]
    python -m cache info [--json]
    python -m cache import transluce --dsn postgresql://… [--model …] [--out data/<slug>.duckdb]
    python -m cache import neuronpedia <folder> | python -m cache import openai <folder>
    python -m cache bundle --out demo.duckdb [--exemplars 5]   # a compact read-only copy for hosting

Every command takes ``--model embedded`` (default) or ``--db PATH``. With ``--model`` and the
model's database still being built, the quick partial database is opened instead, with a note on
stderr (as the dashboard does, :func:`cache.paths.resolve_db_path`). A problem the user can fix
prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from typing import Any

import pandas as pd

from engine.errors import MonitorError, run_command

SEARCH_FIELDS = ["layer", "neuron", "polarity", "description", "score", "similarity", "top_exemplar"]


def parse_layers(text: str) -> tuple[int, int]:
    """``"3"`` → (3, 3); ``"0-10"`` → (0, 10), inclusive."""
    parts = text.strip().split("-")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise MonitorError(f"--layers {text!r} is not a layer or range: use e.g. --layers 5 or --layers 0-10.")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="embedded", help="model whose database to open (default: embedded)")
    common.add_argument("--db", default=None, help="path of a .duckdb file (overrides --model)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--k", type=int, default=20, help="number of results")
    filters.add_argument("--layers", default=None, help="inclusive layer range, e.g. 0-10")
    filters.add_argument("--polarity", type=int, choices=[1, -1], default=None)
    filters.add_argument("--min-score", type=float, default=None, help="keep descriptions scoring at least this")
    filters.add_argument("--scorer", default=None, help="the scorer --min-score applies to (default: the main score)")

    parser = argparse.ArgumentParser(prog="python -m cache", description="Query a neuron database.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", parents=[common, filters], help="semantic search over descriptions")
    s.add_argument("query", help="a concept, e.g. 'Bible verses'")
    s.add_argument("--keyword", default=None, help="also require this literal text in the description")
    s.add_argument("--embedder", default=None, help="local sentence-transformers folder (default: all-MiniLM-L6-v2)")
    s.add_argument("--why", action="store_true", help="say why each hit matched (behaviour vs source part of its summary)")
    s.add_argument("--rank", choices=["behaviour", "summary"], default="behaviour",
                   help="behaviour (default): rank candidates by the query's match to what the neuron does, its "
                        "source label only scaling that (cache.search_explain.rank_by_behaviour); summary: by the "
                        "whole summary's similarity")
    kw = sub.add_parser("keyword", parents=[common, filters], help="literal substring search, best score first")
    kw.add_argument("text")
    n = sub.add_parser("neuron", parents=[common], help="one neuron with its descriptions and exemplars")
    n.add_argument("layer", type=int)
    n.add_argument("neuron", type=int)
    sub.add_parser("info", parents=[common], help="build facts and row counts")
    b = sub.add_parser("bundle", parents=[common], help="a compact read-only copy for hosting (cache/bundle.py)")
    b.add_argument("--out", required=True, help="the bundle file to write, e.g. demo.duckdb")
    b.add_argument("--exemplars", type=int, default=5, help="top exemplars kept per neuron and side (default 5)")
    b.add_argument("--min-overlap", type=float, default=0.9, help="least top-20 search overlap with the source")
    from .importers import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args)


def database_path(args: argparse.Namespace):
    """``--db``, else the model's database, else (while that is missing) its quick partial one."""
    from pathlib import Path

    from .paths import db_path, resolve_db_path

    if args.db:
        return Path(args.db)
    full = db_path(args.model)
    path = resolve_db_path(full)
    if path != full:
        print(f"note: {full.name} is not built yet; using the quick partial database {path.name} "
              "(`python -m precompute status` says how far the full build is).", file=sys.stderr)
    return path


def run(args: argparse.Namespace) -> int:
    from .db import open_database

    if args.command == "import":
        from .importers import run as run_import

        return run_import(args)
    if args.command == "bundle":
        from .bundle import write_bundle

        report = write_bundle(database_path(args), args.out, args.exemplars, args.min_overlap)
        print(json.dumps(report) if args.json else
              f"Wrote {report['path']} ({report['bundle_mb']} MB from {report['source_mb']} MB; top-20 search "
              f"overlap with the source: mean {report['overlap_mean']:.2f}, min {report['overlap_min']:.2f}).")
        return 0
    with open_database(database_path(args)) as db:
        if args.command == "info":
            info = {"path": str(db.path), "meta": db.meta, "counts": db.counts()}
            _print(info, args.json, _format_info)
        elif args.command == "neuron":
            info = db.neuron(args.layer, args.neuron)
            note = db.undescribed_note(info["layer"])
            if note:  # e.g. a layer the quick partial database does not describe
                info["note"] = note
            _print(info, args.json, _format_neuron)
        else:
            layer_range = parse_layers(args.layers) if args.layers else None
            filters = dict(k=args.k, layer_range=layer_range, polarity=args.polarity, min_score=args.min_score,
                           scorer=args.scorer)
            fields = list(SEARCH_FIELDS)
            if args.command == "search":
                from .embedder import embed

                from .search_explain import POOL, match_reasons, rank_by_behaviour

                q = embed([args.query], name=args.embedder)[0]
                embed_parts = lambda t: embed(t, name=args.embedder)  # noqa: E731
                if args.rank == "behaviour":
                    hits = db.semantic_search(q, keyword=args.keyword, **{**filters, "k": POOL * args.k})
                    hits = rank_by_behaviour(q, hits, embed_parts, args.k)
                    fields.append("behaviour_rank")
                else:
                    hits = db.semantic_search(q, keyword=args.keyword, **filters)
                    if args.why:
                        hits = pd.concat([hits, match_reasons(q, hits, embed_parts)], axis=1)
                if args.why:
                    fields += ["summary", "why"]
            else:
                hits = db.keyword_search(args.text, **filters)
            _print(_records(hits[fields]), args.json, _format_hits)
    return 0


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN/NA → None."""
    return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict("records")]


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    if hasattr(v, "item"):  # numpy scalar
        return v.item()
    return v


def _print(obj: Any, as_json: bool, fmt) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False) if as_json else fmt(obj))


def _clip(text: str | None, width: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _format_hits(rows: list[dict]) -> str:
    if not rows:
        return "(no matches)"
    width = max(shutil.get_terminal_size((120, 20)).columns - 34, 30)
    rank = "behaviour_rank" in rows[0]
    lines = [("  rank " if rank else "") + f"{'sim':>6} {'score':>6} {'layer/neuron':>12} pol  description"]
    for r in rows:
        lines.append((f"{_num(r['behaviour_rank']):>6} " if rank else "") + f"{_num(r['similarity']):>6} {_num(r['score'], '{:.2f}'):>6} "
                     f"{r['layer']:>5}/{r['neuron']:<6} {r['polarity']:+d}   {_clip(r['description'], width)}")
        if r.get("why"):
            lines.append(f"{'':>28}why: {_clip(r['why'], width)}")
    return "\n".join(lines)


def _format_neuron(n: dict) -> str:
    lines = [f"Neuron {n['layer']}/{n['neuron']}"]
    if n.get("note"):
        lines.append(f"  note: {n['note']}")
    if n["promotes"] or n["suppresses"]:
        lines.append(f"  promotes:   {' '.join(map(repr, n['promotes'][:10]))}")
        lines.append(f"  suppresses: {' '.join(map(repr, n['suppresses'][:10]))}")
    for pol, d in n["descriptions"].items():
        lines.append(f"  {pol:+d} [{_num(d['score'], '{:.2f}')}] {d['text']}  ({d['summary']}; {d['explainer']})")
    if n["quantiles"]:
        lines.append("  quantiles: " + ", ".join(f"q={q:g}: {v:.3g}" for q, v in n["quantiles"].items()))
    for ex in n["exemplars"]:
        acts = ex["acts"] or []
        sign = ex["polarity"] or 1  # the most extreme token on the exemplar's side
        peak = max(range(len(acts)), key=lambda i: sign * acts[i]) if acts else -1
        text = ("".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(ex["tokens"])) if ex["tokens"]
                else ex["text"] or "")
        pol = f"{ex['polarity']:+d}" if ex["polarity"] else " 0"
        lines.append(f"  {pol} {ex['split']:<6} #{ex['rank']:<3} max={ex['max_act']:.3g} "
                     f"({ex['source']}) {_clip(text, 100)}")
    return "\n".join(lines)


def _format_info(info: dict) -> str:
    from .provenance import bundle_note, summary

    lines = [info["path"]]
    for note in (summary(info["meta"]), bundle_note(info["meta"])):
        if note:
            lines.append(f"  {note}")
    lines += [f"  {k}: {_clip(v, 100)}" for k, v in sorted(info["meta"].items())]
    lines += ["  rows: " + ", ".join(f"{t}={c:,}" for t, c in info["counts"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
