"""Benchmark the three importers on generated sources of N description rows; prints JSON.

    python -m benchmarks.importers --json [--rows 100000]

For each source a generator writes N description rows in the publisher's format:

* ``transluce``: a real PostgreSQL 15 (started in a temporary folder, tests/postgres_server.py)
  holding N/2 neurons × 2 polarities, 2 exemplars per (neuron, polarity) and one quantiles row per
  neuron (the published ``description_embedding`` is a 16-d placeholder: the importer does not
  read it unless ``--keep-source-embeddings``);
* ``neuronpedia``: N features, N explanations (one score each) and N activation rows of 16
  tokens, in ``batch-N.jsonl.gz`` files of 1,024 rows;
* ``openai``: N neurons, each an explanation file and a record of 2 top + 1 random 16-token
  activation records.

Each import runs in its own process (``--worker``), up to the point where the summaries
would be embedded (``rows_only``), and reports its wall time (from process start: it includes
importing the libraries and loading the embedding model, a few seconds) and peak RSS (which
includes that model). The baseline, measured in the same run, is the
bare read of the same source: for Transluce, ``COPY (the importer's three queries) TO STDOUT``
through psycopg; for the folders, decompressing and parsing every file. ``ratio`` = import ÷
baseline. Re-embedding is measured separately (all-MiniLM-L6-v2 on 4,096 generated summaries,
batch 128) and added to the projection for Transluce's 917,504 description rows:

    projected_s = 917,504 × (row-import seconds per description row, at this source's mix)
                + 917,504 / (summaries embedded per second)

The mix matters: the real image's exemplar count per neuron is not known here (we never had
the image), so ``exemplar_rows_per_s`` is reported for scaling.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSLUCE_ROWS = 917_504  # 458,752 neurons × 2 polarities
MODEL = "bench/llama"
TOKENS = 16


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- generators
def make_neuronpedia(root: Path, n: int) -> Path:
    folder = root / "np-model"
    sources = 4
    per = n // sources
    for s in range(sources):
        base = folder / f"{s}-mlp-bench"
        base.mkdir(parents=True)
        (base / "model.jsonl").write_text(json.dumps({"id": "np-model", "layers": sources, "neuronsPerLayer": per}) + "\n")
        for b, start in enumerate(range(0, per, 1024)):
            idx = range(start, min(start + 1024, per))
            rows = {
                "features": [{"modelId": "np-model", "layer": base.name, "index": str(i), "maxActApprox": 1.0 + i % 7,
                              "pos_str": [" a", " b"], "neg_str": [" c"]} for i in idx],
                "explanations": [{"id": f"e{s}-{i}", "modelId": "np-model", "layer": base.name, "index": str(i),
                                  "description": f"tokens about topic {i % 97} in source {s}", "typeName": "t",
                                  "explanationModelName": "m", "scores": [{"value": (i % 10) / 10,
                                  "explanationScoreTypeName": "recall", "explanationScoreModelName": "m"}]} for i in idx],
                "activations": [{"modelId": "np-model", "layer": base.name, "index": str(i),
                                 "tokens": [f" w{j}" for j in range(TOKENS)],
                                 "values": [((i + j) % 5) / 4 for j in range(TOKENS)], "maxValue": 1.0,
                                 "maxValueTokenIndex": 0, "dataSource": "bench"} for i in idx],
            }
            for kind, data in rows.items():
                (base / kind).mkdir(exist_ok=True)
                with gzip.open(base / kind / f"batch-{b}.jsonl.gz", "wt", compresslevel=5) as fh:
                    fh.write("".join(json.dumps(r) + "\n" for r in data))
    return folder


def make_openai(root: Path, n: int) -> Path:
    folder = root / "gpt2-xl"
    layers = 4
    per = n // layers
    for layer in range(layers):
        edir, adir = folder / "explanations" / str(layer), folder / "collated-activations" / str(layer)
        edir.mkdir(parents=True)
        adir.mkdir(parents=True)
        for i in range(per):
            nid = {"layer_index": layer, "neuron_index": i}
            rec = [{"tokens": [f" w{j}" for j in range(TOKENS)], "activations": [((i + j + r) % 5) / 4
                                                                                  for j in range(TOKENS)]}
                   for r in range(3)]
            (adir / f"{i}.json").write_text(json.dumps({"neuron_id": nid, "most_positive_activation_records": rec[:2],
                                                         "random_sample": rec[2:]}))
            (edir / f"{i}.jsonl").write_text(json.dumps({"neuron_id": nid, "scored_explanations": [
                {"explanation": f"words about topic {i % 97}", "scored_simulation": {
                    "ev_correlation_score": (i % 10) / 10, "rsquared_score": 0.1}}]}) + "\n")
    return folder


# --------------------------------------------------------------------------- workers (one process each)
def worker(spec: dict) -> dict:
    """Run one measurement in this process: an import up to embedding, or a bare read."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    if spec["what"] == "import":
        from cache.__main__ import build_parser
        from cache.importers import module

        args = build_parser().parse_args(["import", *spec["argv"]])
        module(args.source).run(args, Path(args.out), progress=False, rows_only=True)
    elif spec["what"] == "read_transluce":
        import psycopg

        from cache.importers.transluce import DEFAULT_TABLE, _SCORE

        join = f"JOIN neurons n ON n.id = x.neuron_id WHERE n.model_id = '{MODEL}' AND n.expert IS NULL"
        queries = [
            f"SELECT n.layer, n.neuron, x.polarity, x.version, x.description, x.description_cleaned, "
            f"x.description_summary, {_SCORE.replace('d.', 'x.')} AS score FROM {DEFAULT_TABLE} x {join} "
            "ORDER BY n.layer, n.neuron, x.polarity",
            f"SELECT n.layer, n.neuron, x.quantiles FROM quantiles x {join} ORDER BY n.layer, n.neuron",
            f"SELECT n.layer, n.neuron, x.polarity, x.rank, x.id, x.activation_value, x.text FROM exemplars x {join} "
            "ORDER BY n.layer, n.neuron, x.polarity, x.rank, x.id",
        ]
        size = 0
        with psycopg.connect(spec["dsn"]) as conn, conn.cursor() as cur:
            for q in queries:
                with cur.copy(f"COPY ({q}) TO STDOUT") as cp:
                    for block in cp:
                        size += len(block)
        spec["bytes"] = size
    elif spec["what"] == "read_files":
        from cache.importers.files import read_json, read_json_lines

        for p in sorted(Path(spec["folder"]).rglob("*")):
            if p.name.endswith((".jsonl.gz", ".jsonl")):
                read_json_lines(p)
            elif p.suffix == ".json":
                read_json(p)
    elif spec["what"] == "embed":
        from cache.embedder import embed, load_embedder

        load_embedder()
        texts = [f"tokens about topic {i} in {['dates', 'code', 'Bible verses', 'decimals'][i % 4]} text"
                 for i in range(spec["n"])]
        t0 = time.perf_counter()
        embed(texts)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": round(_peak_mb(), 1),
            **({"bytes": spec["bytes"]} if "bytes" in spec else {})}


def run_worker(spec: dict) -> dict:
    res = subprocess.run([sys.executable, "-m", "benchmarks.importers", "--worker", json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec['what']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def count_rows(path: Path) -> dict:
    import duckdb

    from cache.paths import tmp_path

    with duckdb.connect(str(tmp_path(path)), read_only=True) as c:
        return {t: c.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                for t in ("descriptions", "scores", "exemplars", "sequences", "quantiles", "neurons")}


def measure(name: str, argv: list[str], baseline: dict, out: Path) -> dict:
    imp = run_worker({"what": "import", "argv": argv})
    rows = count_rows(out)
    total = sum(v for k, v in rows.items() if k != "sequences")
    return {
        "rows": rows, "import_s": round(imp["seconds"], 2), "baseline_read_s": round(baseline["seconds"], 2),
        "ratio": round(imp["seconds"] / baseline["seconds"], 2),
        "description_rows_per_s": round(rows["descriptions"] / imp["seconds"], 1),
        "all_rows_per_s": round(total / imp["seconds"], 1),
        "exemplar_rows_per_s": round(rows["exemplars"] / imp["seconds"], 1) if rows["exemplars"] else None,
        "peak_rss_mb": imp["peak_rss_mb"], "baseline_peak_rss_mb": baseline["peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="description rows per generated source")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--only", choices=["transluce", "neuronpedia", "openai"], action="append")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(ROOT))
    only = args.only or ["transluce", "neuronpedia", "openai"]
    result: dict = {"rows_requested": args.rows, "load_avg": os.getloadavg(), "cpus": os.cpu_count()}
    embed = run_worker({"what": "embed", "n": 4096})
    embed_rate = 4096 / embed["seconds"]
    result["embed_summaries_per_s"] = round(embed_rate, 1)
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = Path(tmp)
        if "transluce" in only:
            import psycopg

            from tests.postgres_server import PostgresServer, create_transluce_tables, fill_transluce

            with PostgresServer() as pg:
                t0 = time.perf_counter()
                with psycopg.connect(pg.dsn, autocommit=True) as conn:
                    create_transluce_tables(conn)
                    layers = 25
                    fill_transluce(conn, MODEL, layers, args.rows // 2 // layers, exemplars=2, quirks=False, dim=16)
                    conn.execute("ANALYZE")
                gen_s = time.perf_counter() - t0
                base = run_worker({"what": "read_transluce", "dsn": pg.dsn})
                out = root / "transluce.duckdb"
                r = measure("transluce", ["transluce", "--dsn", pg.dsn, "--model", MODEL, "--out", str(out)], base, out)
            per_row_s = r["import_s"] / r["rows"]["descriptions"]
            r["generate_s"] = round(gen_s, 1)
            r["projected_full_import_s"] = round(TRANSLUCE_ROWS * per_row_s + TRANSLUCE_ROWS / embed_rate)
            r["projected_rows_s"] = round(TRANSLUCE_ROWS * per_row_s)
            r["projected_embed_s"] = round(TRANSLUCE_ROWS / embed_rate)
            d = r["rows"]["descriptions"]
            r["projection_mix"] = (f"per description row: {r['rows']['exemplars'] / d:g} exemplar rows, "
                                   f"{r['rows']['quantiles'] / d:g} quantile rows")
            result["transluce"] = r
        if "neuronpedia" in only:
            folder = make_neuronpedia(root, args.rows)
            base = run_worker({"what": "read_files", "folder": str(folder)})
            out = root / "np.duckdb"
            result["neuronpedia"] = measure("neuronpedia", ["neuronpedia", str(folder), "--out", str(out)], base, out)
        if "openai" in only:
            folder = make_openai(root, args.rows)
            base = run_worker({"what": "read_files", "folder": str(folder)})
            out = root / "openai.duckdb"
            result["openai"] = measure("openai", ["openai", str(folder), "--out", str(out)], base, out)
    result["load_avg_after"] = os.getloadavg()
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
