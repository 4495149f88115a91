"""Import OpenAI's GPT-2 XL neuron records and explanations (openai/automated-interpretability).

The public dataset has one file per neuron, in the JSON of ``neuron_explainer``'s dataclasses
(``fast_dataclasses``: plain JSON objects, optionally with a ``dataclass_name`` key):

* ``collated-activations/{layer}/{neuron}.json``: a ``NeuronRecord``: ``neuron_id {layer_index,
  neuron_index}``, ``most_positive_activation_records`` and ``random_sample`` (lists of
  ``ActivationRecord {tokens, activations}``), ``random_sample_by_quantile``,
  ``quantile_boundaries``, ``mean``, ``variance``, ``skewness``, ``kurtosis``;
* ``explanations/{layer}/{neuron}.jsonl``: one ``NeuronSimulationResults`` line:
  ``neuron_id`` and ``scored_explanations [{explanation, scored_simulation
  {ev_correlation_score, rsquared_score, absolute_dev_explained_score,
  scored_sequence_simulations}}]``.

What is imported:

* descriptions (polarity +1: the records are the most *positive* activations): of the neuron's
  scored explanations the one with the highest ``ev_correlation_score`` (ties: the first); text
  and summary = ``explanation`` (already a short phrase); main score = its ``ev_correlation_score``;
* scores of that explanation: ``openai-ev-correlation``, ``openai-rsquared``,
  ``openai-absolute-dev-explained`` (each that is present; a JSON null is stored as NULL, "no
  prediction"), split ``source``, ``n`` = the number of scored sequences;
* exemplars: ``most_positive_activation_records`` in their published order (split ``source``,
  rank 0 = first) and ``random_sample`` (split ``random``), with their per-token activations;
* quantiles: only ``q = 1`` = the largest activation in the top records (the published
  ``quantile_boundaries`` do not say which levels they are, so they are not imported; nor are
  ``random_sample_by_quantile`` and the moments).

GPT-2 XL is not a Llama, so the database is for browsing only (meta ``engine_model`` is empty).
Neurons are read in (layer, neuron) order, ``--batch-size`` neurons per committed transaction.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import MonitorError

from ..writer import ARROW_SCHEMAS
from .files import numbered, read_json
from .job import ImportJob, finite, frame, import_command, token_record

NAME = "openai"
DEFAULT_MODEL = "gpt2-xl"
URL = "https://github.com/openai/automated-interpretability"
LICENCE = "not stated by OpenAI for the dataset: check before redistributing"
SCORERS = {  # ScoredSimulation field → (scorer name, what it is)
    "ev_correlation_score": ("openai-ev-correlation", "correlation of expected simulated and true activations, "
                                                      "pooled over all scored sequences (OpenAI's preferred score)"),
    "rsquared_score": ("openai-rsquared", "R² of the simulated activations"),
    "absolute_dev_explained_score": ("openai-absolute-dev-explained",
                                     "1 − mean|real − predicted| / mean|real|"),
}
SCORER_VERSION = "as-published"
LIVE_NOTE = ("GPT-2 XL is not a Llama: the engine hooks model.model.layers[L].mlp.down_proj of Llama checkpoints, "
             "and GPT-2's MLP is another architecture, so live chat, traces, steering and experiments are off for "
             "this database. Browse the neurons and search their descriptions.")
EXPLANATIONS, ACTIVATIONS = "explanations", "collated-activations"


def add_arguments(p) -> None:
    p.add_argument("folder", help="a folder with explanations/{layer}/{neuron}.jsonl and/or "
                                  "collated-activations/{layer}/{neuron}.json")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model these neurons are of (default {DEFAULT_MODEL})")


def neuron_files(folder: Path) -> list[tuple[int, int, Path | None, Path | None]]:
    """``(layer, neuron, explanation file, activations file)`` of every neuron, by (layer, neuron)."""
    out = {}
    for sub, suffix, slot in ((EXPLANATIONS, ".jsonl", 0), (ACTIVATIONS, ".json", 1)):
        for layer, ldir in numbered(folder / sub):
            for neuron, f in numbered(ldir, suffix):
                out.setdefault((layer, neuron), [None, None])[slot] = f
    return [(l, n, e, a) for (l, n), (e, a) in sorted(out.items())]


def _check_id(data: dict, layer: int, neuron: int, path: Path) -> None:
    nid = data.get("neuron_id") or {}
    got = (nid.get("layer_index"), nid.get("neuron_index"))
    if got != (None, None) and (got[0] != layer or got[1] != neuron):
        raise MonitorError(f"{path} says it is neuron {got[0]}/{got[1]} but sits at {layer}/{neuron}: the files are "
                           "misplaced; move it, or delete it and rerun.")


def explanation_rows(data: dict, layer: int, neuron: int, path: Path) -> tuple[list[tuple], list[tuple]]:
    """(description rows, score rows) of one ``NeuronSimulationResults``."""
    _check_id(data, layer, neuron, path)
    best, best_score = None, None
    for e in data.get("scored_explanations") or []:
        text = str(e.get("explanation") or "").strip()
        if not text:
            continue
        score = finite((e.get("scored_simulation") or {}).get("ev_correlation_score"))
        if best is None or (score is not None and (best_score is None or score > best_score)):
            best, best_score = e, score
    if best is None:
        return [], []
    text = str(best["explanation"]).strip()
    sim = best.get("scored_simulation") or {}
    n_seq = len(sim.get("scored_sequence_simulations") or []) or None
    scores = [(layer, neuron, 1, name, SCORER_VERSION, finite(sim[field]), "source", n_seq,
               json.dumps({"source": NAME, "file": f"{EXPLANATIONS}/{layer}/{neuron}.jsonl",
                           "field": f"scored_simulation.{field}"}))
              for field, (name, _) in SCORERS.items() if field in sim]
    desc = [(layer, neuron, 1, text, text, best_score, "openai-automated-interpretability",
             SCORERS["ev_correlation_score"][0] if best_score is not None else None)]
    return desc, scores


def record_rows(data: dict, layer: int, neuron: int, path: Path, seq_id: int):
    """(exemplar rows, sequence rows, quantile rows, next seq_id) of one ``NeuronRecord``."""
    _check_id(data, layer, neuron, path)
    ex, seqs = [], []
    for key, pol, split in (("most_positive_activation_records", 1, "source"), ("random_sample", 0, "random")):
        for rank, rec in enumerate(data.get(key) or []):
            top, scale, codes, text, tokens = token_record(rec.get("tokens"), rec.get("activations"), path,
                                                           f"{key}[{rank}]")
            ex.append((layer, neuron, pol, split, rank, seq_id, top, scale, codes))
            seqs.append((seq_id, NAME, text, tokens))
            seq_id += 1
    tops = [e[6] for e in ex if e[2] == 1]
    quants = [(layer, neuron, 1.0, max(tops))] if tops else []
    return ex, seqs, quants, seq_id


def run(args, out, progress: bool = True, rows_only: bool = False) -> "Path | None":
    """``python -m cache import openai``: see the module docstring. ``rows_only`` stops before embedding and
    finishing (the benchmark times the row import with it)."""
    from engine.loader import model_slug

    folder = Path(args.folder)
    if not folder.is_dir():
        raise MonitorError(f"{folder} is not a folder: point at OpenAI's dataset (with {EXPLANATIONS}/ and/or "
                           f"{ACTIVATIONS}/).")
    files = neuron_files(folder)
    if not files:
        raise MonitorError(f"{folder} has no {EXPLANATIONS}/<layer>/<neuron>.jsonl or {ACTIVATIONS}/<layer>/"
                           "<neuron>.json files: point at OpenAI's dataset folder.")
    job = ImportJob(out, {"source": NAME, "location": str(folder.resolve()), "model": args.model},
                    embedder=args.embedder, fresh=args.fresh, force=args.force, progress=progress,
                        embed_chunk=args.embed_chunk)
    try:
        step = "neurons"
        if not job.done(step):
            last = job.position(step)
            todo = [f for f in files if last is None or (f[0], f[1]) > tuple(last)]
            with job.bar(len(files), "neurons", initial=len(files) - len(todo)) as bar:
                seq_id = job.next_seq_id()
                for start in range(0, len(todo), args.batch_size):
                    chunk = todo[start:start + args.batch_size]
                    desc, scores, ex, seqs, quants = [], [], [], [], []
                    for layer, neuron, efile, afile in chunk:
                        if efile is not None:
                            d, s = explanation_rows(read_json(efile), layer, neuron, efile)
                            desc += d
                            scores += s
                        if afile is not None:
                            e, q_seqs, q, seq_id = record_rows(read_json(afile), layer, neuron, afile, seq_id)
                            ex += e
                            seqs += q_seqs
                            quants += q

                    def write(w, desc=desc, scores=scores, ex=ex, seqs=seqs, quants=quants):
                        w.write_descriptions(frame(desc, ARROW_SCHEMAS["descriptions"].names))
                        w.write_scores(frame(scores, ARROW_SCHEMAS["scores"].names))
                        w.write_sequences(frame(seqs, ("seq_id", "source", "text", "tokens")))
                        w.write_exemplars(frame(ex, ARROW_SCHEMAS["exemplars"].names))
                        w.write_quantiles(frame(quants, ("layer", "neuron", "q", "value")))

                    job.commit(step, list(chunk[-1][:2]), write)
                    bar.update(len(chunk))
            job.mark_done(step)
        if rows_only:
            return None
        job.embed_summaries()
        n_layers = max(f[0] for f in files) + 1
        n_neurons = max(f[1] for f in files) + 1
        counts = {t: int(job.conn.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0])
                  for t in ("descriptions", "scores", "exemplars", "quantiles")}
        lacks = ["negative_polarity", "lower_quantiles", "output_tokens", "corpus"]
        lacks += ["exemplars"] if not counts["exemplars"] else []
        return job.finish({
            "model_id": args.model, "model_slug": model_slug(args.model),
            "n_layers": str(n_layers), "n_neurons": str(n_neurons),
            "explainer": "openai-automated-interpretability (published explanations)",
            "scorer": SCORERS["ev_correlation_score"][0],
            "scorers": json.dumps([{"name": name, "version": SCORER_VERSION, "description": what}
                                   for name, what in SCORERS.values()]),
            "source": json.dumps({
                "name": NAME, "format": "OpenAI automated-interpretability (GPT-2 XL)",
                "location": str(folder.resolve()), "url": URL, "licence": LICENCE,
                "version": "explanations + collated-activations",
                "tables": {"explanations": f"{EXPLANATIONS}/{{layer}}/{{neuron}}.jsonl",
                           "activations": f"{ACTIVATIONS}/{{layer}}/{{neuron}}.json"},
                "rows": counts,
            }),
            "lacks": json.dumps(lacks),
            "engine_model": "", "live_note": LIVE_NOTE,
            "import_command": import_command(["python", "-m", "cache", "import", NAME, str(folder), "--model",
                                              args.model, "--out", str(out)]),
        })
    finally:
        job.close()
