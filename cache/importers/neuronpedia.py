"""Import a Neuronpedia export (``<modelId>/<source>/{features,explanations,activations}/batch-N.jsonl.gz``).

Neuronpedia's exporter (``utils/neuronpedia-utils/neuronpedia_utils/export-data.py`` in
hijohnnylin/neuronpedia) writes, per model and source (``<layer>-<set>``, e.g. ``6-res-jb``),
batches of 1,024 rows (ordered by feature index) of three tables, plus ``model.jsonl``:

* ``features``: a ``Neuron`` row: ``modelId, layer`` (the source id), ``index`` (a string),
  ``maxActApprox``, ``pos_str``/``neg_str`` (the output tokens it promotes / suppresses), …;
* ``explanations``: ``id, modelId, layer, index, description, typeName, explanationModelName``, …;
  a row may carry ``scores``: ``ExplanationScore`` rows ``{value, explanationScoreTypeName,
  explanationScoreModelName}``;
* ``activations``: ``modelId, layer, index, tokens[], values[], maxValue, maxValueTokenIndex,
  dataSource``, …: a text and its per-token activations.

What is imported (``--model`` is checked against every row's ``modelId``):

* neurons: ``promotes = pos_str``, ``suppresses = neg_str``; quantiles: ``q = 1`` (the max) =
  ``maxActApprox``, the only level published;
* descriptions (polarity +1; Neuronpedia has one side): text and summary = ``description``,
  ``explainer = neuronpedia:<typeName>/<explanationModelName>``. Of several explanations of one
  feature the one with the highest main score is kept (its first numeric score; unscored ones
  lose; ties: the first in the files);
* scores of the kept explanation: scorer ``neuronpedia:<type>:<model>``, version ``<model>``,
  split ``source``; the first numeric one is the main ``score``;
* exemplars: each activation row, split ``source``, ranked by ``maxValue`` (then file order), its
  per-token ``values`` encoded like our own (:mod:`cache.codec`), its tokens and text as a
  ``sequences`` row (source = ``dataSource`` or the source id).

Layer = the number a source id starts with; index = neuron. Two sources of one layer are
refused (import one at a time). ``--engine-model`` names the Hugging Face checkpoint the engine
should load for live features when the source holds a Llama's MLP neurons; without it the
database is for browsing only (Neuronpedia's model ids are not checkpoints).

Each file is parsed whole, then written with its progress marker in one transaction; explanations
and activations are staged and ranked in one final SQL pass, so a feature whose rows straddle
two batch files is handled like any other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.errors import MonitorError

from .files import batch_files, read_json_lines
from .job import ImportJob, finite, frame, import_command, token_record

NAME = "neuronpedia"
KINDS = ("features", "explanations", "activations")
URL = "https://www.neuronpedia.org"
LICENCE = "not stated in the export (each source's SAE or model licence applies): check before redistributing"
_LAYER = re.compile(r"^(\d+)-")

STAGING = {
    "_np_explanations": "layer INTEGER, neuron INTEGER, ord BIGINT, text VARCHAR, explainer VARCHAR, score DOUBLE, "
                        "score_scorer VARCHAR",
    "_np_scores": "ord BIGINT, scorer VARCHAR, version VARCHAR, value DOUBLE, detail VARCHAR",
    "_np_activations": "layer INTEGER, neuron INTEGER, ord BIGINT, seq_id INTEGER, max_act FLOAT, scale FLOAT, "
                       "acts TINYINT[]",
}


def add_arguments(p) -> None:
    p.add_argument("folder", help="a Neuronpedia export: a model folder of sources, or one source folder")
    p.add_argument("--model", default=None, help="the Neuronpedia model id the export must be of (default: the "
                                                  "one in model.jsonl or the first row)")
    p.add_argument("--engine-model", default="", help="the Hugging Face id or folder of the Llama whose MLP neurons "
                                                      "these are, for live traces and steering (default: none, "
                                                      "browse only)")


def out_name(args) -> str:
    """The model name the default output is named after: --model, else the export's model folder."""
    folder = Path(args.folder).resolve()
    return args.model or (folder.parent.name if _LAYER.match(folder.name) else folder.name)


def find_sources(folder: Path) -> list[tuple[int, str, Path]]:
    """``(layer, source id, path)`` of every source in ``folder``, by layer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MonitorError(f"{folder} is not a folder: point at a Neuronpedia export (<modelId>/ or "
                           "<modelId>/<source>/ with features/, explanations/, activations/).")

    def is_source(p: Path) -> bool:
        return any((p / k).is_dir() for k in KINDS)

    paths = [folder] if is_source(folder) else sorted(p for p in folder.iterdir() if p.is_dir() and is_source(p))
    if not paths:
        raise MonitorError(f"{folder} holds no Neuronpedia source (no features/, explanations/ or activations/ "
                           "folder in it or its subfolders).")
    out, seen = [], {}
    for p in paths:
        m = _LAYER.match(p.name)
        if not m:
            raise MonitorError(f"Source folder {p.name!r} does not start with a layer number (Neuronpedia source ids "
                               "look like '6-res-jb'): rename it, or point at the source folders one by one.")
        layer = int(m.group(1))
        if layer in seen:
            raise MonitorError(f"Sources {seen[layer]!r} and {p.name!r} are both layer {layer}: import one at a time "
                               "(point at one source folder).")
        seen[layer] = p.name
        out.append((layer, p.name, p))
    return sorted(out)


def _model_info(sources: list[tuple[int, str, Path]]) -> dict:
    for _, _, path in sources:
        for f in (path / "model.jsonl", path.parent / "model.jsonl"):
            if f.is_file():
                rows = read_json_lines(f)
                if rows:
                    return rows[0]
    return {}


class _Rows:
    """Checks shared by every row: its model, source and index."""

    def __init__(self, model: str | None):
        self.model = model

    def key(self, row: dict, path: Path, n: int, source: str) -> int:
        model = row.get("modelId")
        if model is not None:
            if self.model is None:
                self.model = str(model)
            elif str(model) != self.model:
                raise MonitorError(f"{path} row {n} is of model {model!r}, not {self.model!r} (--model): point at one "
                                   "model's export, or pass the --model it is of.")
        if row.get("layer") is not None and str(row["layer"]) != source:
            raise MonitorError(f"{path} row {n} is of source {row['layer']!r} but sits in folder {source!r}: the "
                               "export's folders are mixed up.")
        try:
            return int(str(row["index"]))
        except (KeyError, ValueError) as err:
            raise MonitorError(f"{path} is corrupt (row {n} has no whole-number index): download it again, or "
                               "delete it, then rerun the same command.") from err


def _feature_rows(rows, layer, path, source, check):
    neurons, quants = [], []
    for n, row in enumerate(rows, 1):
        idx = check.key(row, path, n, source)
        neurons.append((layer, idx, [str(t) for t in row.get("pos_str") or []],
                        [str(t) for t in row.get("neg_str") or []]))
        top = finite(row.get("maxActApprox"))
        if top is not None:
            quants.append((layer, idx, 1.0, top))
    return neurons, quants


def _explanation_rows(rows, layer, path, source, check, ord0):
    expl, scores = [], []
    for n, row in enumerate(rows, 1):
        idx = check.key(row, path, n, source)
        text = str(row.get("description") or "").strip()
        if not text:
            continue
        ord_ = ord0 + n
        main, main_scorer, seen = None, None, set()
        for s in row.get("scores") or []:
            kind, model = s.get("explanationScoreTypeName"), s.get("explanationScoreModelName")
            scorer = f"{NAME}:{kind}:{model}"
            if scorer in seen:
                continue
            seen.add(scorer)
            value = finite(s.get("value"))
            if value is not None and main is None:
                main, main_scorer = value, scorer
            scores.append((ord_, scorer, str(model), value,
                           json.dumps({"source": NAME, "file": path.name, "explanation": row.get("id"),
                                       "type": kind, "model": model})))
        explainer = f"{NAME}:{row.get('typeName') or '?'}/{row.get('explanationModelName') or '?'}"
        expl.append((layer, idx, ord_, text, explainer, main, main_scorer))
    return expl, scores


def _activation_rows(rows, layer, path, source, check, ord0, seq_id):
    acts, seqs = [], []
    for n, row in enumerate(rows, 1):
        idx = check.key(row, path, n, source)
        top, scale, codes, text, tokens = token_record(row.get("tokens"), row.get("values"), path, f"row {n}")
        peak = finite(row.get("maxValue"))
        acts.append((layer, idx, ord0 + n, seq_id, top if peak is None else peak, scale, codes))
        seqs.append((seq_id, str(row.get("dataSource") or source), text, tokens))
        seq_id += 1
    return acts, seqs, seq_id


def run(args, out, progress: bool = True, rows_only: bool = False) -> "Path | None":
    """``python -m cache import neuronpedia``: see the module docstring. ``rows_only`` stops before embedding and
    finishing (the benchmark times the row import with it)."""
    from engine.loader import model_slug

    folder = Path(args.folder)
    sources = find_sources(folder)
    info = _model_info(sources)
    if args.model and info.get("id") and str(info["id"]) != args.model:
        raise MonitorError(f"{folder} is an export of model {info['id']!r}, not {args.model!r} (--model): pass "
                           f"--model {info['id']}, or point at the other model's export.")
    check = _Rows(args.model or (str(info["id"]) if info.get("id") else None))
    if not any(batch_files(path / kind) for _, _, path in sources for kind in KINDS):
        raise MonitorError(f"{folder} holds no batch-N.jsonl.gz files to import: point at a Neuronpedia export.")
    job = ImportJob(out, {"source": NAME, "location": str(folder.resolve()), "model": args.model,
                          "engine_model": args.engine_model},
                    embedder=args.embedder, fresh=args.fresh, force=args.force, progress=progress,
                        embed_chunk=args.embed_chunk)
    try:
        check.model = check.model or job.get("model")  # learnt from the rows before a kill
        for table, cols in STAGING.items():
            job.conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
        for kind in KINDS:
            _import_kind(job, kind, sources, check)
        _finalize(job)
        if rows_only:
            return None
        job.embed_summaries()
        model = check.model or job.get("model") or "unknown"
        n_layers, n_neurons = _shape(job, info)
        scorers = job.conn.execute("SELECT scorer, min(version) FROM scores GROUP BY scorer ORDER BY scorer").fetchall()
        main = job.conn.execute("SELECT score_scorer FROM descriptions WHERE score_scorer IS NOT NULL "
                                "GROUP BY score_scorer ORDER BY count(*) DESC, score_scorer LIMIT 1").fetchall()
        counts = {t: int(job.conn.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0])
                  for t in ("neurons", "descriptions", "scores", "exemplars", "quantiles")}
        lacks = ["negative_polarity", "lower_quantiles", "random_exemplars", "corpus"]
        lacks += ["output_tokens"] if not counts["neurons"] else []
        lacks += ["exemplars"] if not counts["exemplars"] else []
        words = ["python", "-m", "cache", "import", NAME, str(folder), "--out", str(out)]
        words += ["--model", args.model] if args.model else []
        words += ["--engine-model", args.engine_model] if args.engine_model else []
        return job.finish({
            "model_id": model, "model_slug": model_slug(model), "n_layers": str(n_layers), "n_neurons": str(n_neurons),
            "explainer": "neuronpedia (published explanations)",
            "scorer": main[0][0] if main else "none",
            "scorers": json.dumps([{"name": s, "version": v, "description": "Neuronpedia ExplanationScore as published"}
                                   for s, v in scorers]),
            "source": json.dumps({
                "name": NAME, "format": "Neuronpedia export", "location": str(folder.resolve()), "url": URL,
                "licence": LICENCE, "version": ", ".join(s for _, s, _ in sources),
                "tables": {k: f"<source>/{k}/batch-N.jsonl.gz" for k in KINDS}, "sources": [s for _, s, _ in sources],
                "rows": counts,
            }),
            "lacks": json.dumps(lacks),
            "engine_model": args.engine_model,
            "live_note": "" if args.engine_model else (
                f"Neuronpedia's model id {model!r} is not a checkpoint the engine can load, so live chat, traces, "
                "steering and experiments are off. If these are the MLP neurons of a Llama (not SAE features), "
                "re-import with --engine-model <Hugging Face id or folder>."),
            "import_command": import_command(words),
        })
    finally:
        job.close()


def _import_kind(job: ImportJob, kind: str, sources, check: _Rows) -> None:
    if job.done(kind):
        return
    files = [(layer, source, f) for layer, source, path in sources for f in batch_files(path / kind)]
    with job.bar(len(files), f"{kind} (files)") as bar:
        for i, (layer, source, f) in enumerate(files):
            marker = f"file:{kind}:{source}/{f.name}"
            if job.get(marker) is not None:
                bar.update(1)
                continue
            rows = read_json_lines(f)
            ord0 = i * 1_000_000
            if kind == "features":
                neurons, quants = _feature_rows(rows, layer, f, source, check)

                def write(w, neurons=neurons, quants=quants):
                    w.write_neurons(frame(neurons, ("layer", "neuron", "promotes", "suppresses")))
                    w.write_quantiles(frame(quants, ("layer", "neuron", "q", "value")))
            elif kind == "explanations":
                expl, scores = _explanation_rows(rows, layer, f, source, check, ord0)

                def write(w, expl=expl, scores=scores):
                    _stage(w, "_np_explanations", frame(expl, ("layer", "neuron", "ord", "text", "explainer", "score",
                                                               "score_scorer")))
                    _stage(w, "_np_scores", frame(scores, ("ord", "scorer", "version", "value", "detail")))
            else:
                acts, seqs, _ = _activation_rows(rows, layer, f, source, check, ord0, job.next_seq_id())

                def write(w, acts=acts, seqs=seqs):
                    w.write_sequences(frame(seqs, ("seq_id", "source", "text", "tokens")))
                    _stage(w, "_np_activations", frame(acts, ("layer", "neuron", "ord", "seq_id", "max_act", "scale",
                                                              "acts")))

            def write_and_mark(w, write=write, marker=marker, n=len(rows)):
                write(w)
                job.set(marker, {"rows": n})
                if check.model:
                    job.set("model", check.model)

            job.commit(kind, {"file": str(f)}, write_and_mark)
            bar.update(1)
    job.mark_done(kind, {"files": len(files)})


def _stage(w, table: str, df) -> None:
    if len(df):
        w.conn.register("_batch", df)
        try:
            w.conn.execute(f"INSERT INTO {table} SELECT {', '.join(df.columns)} FROM _batch")
        finally:
            w.conn.unregister("_batch")


def _finalize(job: ImportJob) -> None:
    """Keep each feature's best explanation and its scores; rank the activations; drop the staging."""
    if job.done("finalize"):
        return
    chosen = ("(SELECT * FROM _np_explanations QUALIFY row_number() OVER "
              "(PARTITION BY layer, neuron ORDER BY score DESC NULLS LAST, ord) = 1)")

    def write(w):
        c = w.conn
        c.execute(f"INSERT INTO descriptions (layer, neuron, polarity, text, summary, score, explainer, score_scorer) "
                  f"SELECT layer, neuron, 1, text, text, score, explainer, score_scorer FROM {chosen} "
                  "ORDER BY layer, neuron")
        c.execute(f"INSERT INTO scores (layer, neuron, polarity, scorer, version, value, split, n, detail) "
                  f"SELECT e.layer, e.neuron, 1, s.scorer, s.version, s.value, 'source', NULL, s.detail "
                  f"FROM _np_scores s JOIN {chosen} e ON s.ord = e.ord ORDER BY e.layer, e.neuron, s.scorer")
        c.execute("INSERT INTO exemplars (layer, neuron, polarity, split, rank, seq_id, max_act, scale, acts) "
                  "SELECT layer, neuron, 1, 'source', "
                  "row_number() OVER (PARTITION BY layer, neuron ORDER BY max_act DESC, ord) - 1 AS r, "
                  "seq_id, max_act, scale, acts FROM _np_activations ORDER BY layer, neuron, r")
        for table in STAGING:
            c.execute(f"DELETE FROM {table}")

    job.commit("finalize", {}, write)
    job.mark_done("finalize")


def _shape(job: ImportJob, info: dict) -> tuple[int, int]:
    """(layers, neurons): model.jsonl's ``layers`` and ``neuronsPerLayer``, widened to every row seen."""
    seen = job.conn.execute(
        "SELECT max(layer) + 1, max(neuron) + 1 FROM (SELECT layer, neuron FROM neurons UNION ALL "
        "SELECT layer, neuron FROM descriptions UNION ALL SELECT layer, neuron FROM exemplars "
        "UNION ALL SELECT layer, neuron FROM quantiles)").fetchall()[0]
    if seen[0] is None:
        raise MonitorError("The export holds no rows to import (no features, explanations or activations).")
    layers = max(int(seen[0]), int(finite(info.get("layers")) or 0))
    neurons = max(int(seen[1]), int(finite(info.get("neuronsPerLayer")) or 0))
    return layers, neurons
