"""Small export folders in the formats Neuronpedia and OpenAI publish (the importers' fixtures).

* :func:`neuronpedia_export`: ``<modelId>/<source>/{features,explanations,activations}/batch-N.jsonl.gz``
  and ``model.jsonl``, as ``export-data.py`` of hijohnnylin/neuronpedia writes them;
* :func:`openai_dataset`: ``explanations/{layer}/{neuron}.jsonl`` and
  ``collated-activations/{layer}/{neuron}.json`` in ``neuron_explainer``'s dataclass JSON.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def neuronpedia_export(root: Path, model: str = "llama-np") -> Path:
    """Two sources (layers 0 and 2) with features, explanations (two for one feature, split
    across batch files, with ExplanationScore rows) and activations (per-token values)."""
    folder = root / model
    for layer in (0, 2):
        src = f"{layer}-mlp-test"
        base = folder / src
        (base / "model.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (base / "model.jsonl").write_text(json.dumps({"id": model, "layers": 4, "neuronsPerLayer": 8}) + "\n")
        feats = [{"modelId": model, "layer": src, "index": str(i), "maxActApprox": 3.0 + i + layer,
                  "pos_str": [f" up{i}", "x"], "neg_str": [f" down{i}"], "frac_nonzero": 0.1} for i in range(6)]
        write_jsonl_gz(base / "features" / "batch-0.jsonl.gz", feats[:3])
        write_jsonl_gz(base / "features" / "batch-1.jsonl.gz", feats[3:])

        def expl(i, text, scores, eid):
            return {"id": eid, "modelId": model, "layer": src, "index": str(i), "description": text,
                    "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini", "authorId": "a",
                    "scores": scores}

        score = lambda v, kind="recall_alt", m="gpt-4o-mini": {"value": v, "explanationScoreTypeName": kind,  # noqa: E731
                                                               "explanationScoreModelName": m}
        e0 = [expl(0, f"dates in layer {layer}", [score(0.4), score(0.9, "eleuther_fuzz")], f"e{layer}0"),
              expl(1, f"Bible verses L{layer}", [], f"e{layer}1"),
              expl(2, f"weak numbers L{layer}", [score(0.1)], f"e{layer}2a")]
        e1 = [expl(2, f"decimal numbers L{layer}", [score(0.7)], f"e{layer}2b"),  # beats e2a, in the next file
              expl(3, f"code tokens L{layer}", [score(None), score(0.3, "eleuther_fuzz", "llama")], f"e{layer}3"),
              expl(5, "", [], f"e{layer}5")]  # empty: not imported
        write_jsonl_gz(base / "explanations" / "batch-0.jsonl.gz", e0)
        write_jsonl_gz(base / "explanations" / "batch-1.jsonl.gz", e1)
        acts = []
        for i in range(4):
            for j in range(3):
                vals = [0.0, (j + 1) * (i + 1) * 0.5, -0.25 * j, 0.1 * layer]
                acts.append({"id": f"a{layer}{i}{j}", "modelId": model, "layer": src, "index": str(i),
                             "tokens": ["<bos>", " the", f" tok{j}", "\n"], "values": vals, "maxValue": max(vals),
                             "maxValueTokenIndex": int(np.argmax(vals)), "minValue": min(vals),
                             "dataSource": "pile" if j else None})
        write_jsonl_gz(base / "activations" / "batch-0.jsonl.gz", acts[:7])
        write_jsonl_gz(base / "activations" / "batch-1.jsonl.gz", acts[7:])
    return folder


def openai_dataset(root: Path) -> tuple[Path, dict]:
    """explanations/{l}/{n}.jsonl and collated-activations/{l}/{n}.json for 2 layers × 3 neurons."""
    folder = root / "gpt2-xl"
    truth = {}
    for layer in range(2):
        for neuron in range(3):
            rec = lambda toks, acts: {"dataclass_name": "ActivationRecord", "tokens": toks, "activations": acts}  # noqa: E731
            top = [rec([" a", " b", f" n{neuron}"], [0.0, 2.0 - r + layer, 0.5]) for r in range(3)]
            rnd = [rec([" r", "\n"], [0.01 * r, -0.02]) for r in range(2)]
            record = {"dataclass_name": "NeuronRecord",
                      "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": neuron},
                      "random_sample": rnd, "random_sample_by_quantile": [rnd], "quantile_boundaries": [0.0, 1.0],
                      "mean": 0.1, "variance": 0.2, "skewness": 0.0, "kurtosis": 3.0,
                      "most_positive_activation_records": top}
            p = folder / "collated-activations" / str(layer) / f"{neuron}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(record))
            sims = [{"dataclass_name": "ScoredSequenceSimulation"}] * (4 + neuron)
            expls = [{"explanation": f"words about topic {layer}-{neuron}",
                      "scored_simulation": {"scored_sequence_simulations": sims, "ev_correlation_score": 0.2 + neuron / 10,
                                            "rsquared_score": 0.05, "absolute_dev_explained_score": None}}]
            if neuron == 1:
                expls.append({"explanation": f"a better one {layer}", "scored_simulation": {
                    "scored_sequence_simulations": sims, "ev_correlation_score": 0.8, "rsquared_score": 0.6}})
            if neuron == 2:
                expls[0]["scored_simulation"]["ev_correlation_score"] = None
            truth[(layer, neuron)] = (top, rnd, expls)
            if (layer, neuron) == (1, 0):
                continue  # a neuron with activations but no explanation file
            e = folder / "explanations" / str(layer) / f"{neuron}.jsonl"
            e.parent.mkdir(parents=True, exist_ok=True)
            e.write_text(json.dumps({"dataclass_name": "NeuronSimulationResults", "neuron_id": record["neuron_id"],
                                     "scored_explanations": expls}) + "\n")
    return folder, truth
