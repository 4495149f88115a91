"""The importers (cache/importers/): Transluce's NeuronDB from a real PostgreSQL, Neuronpedia and
OpenAI export folders written in their published formats.

Every imported row is compared with what the source holds, computed independently here from
the rows the test wrote (brute force, in Python). Imports are SIGKILLed mid-way (the
``MONITOR_IMPORT_KILL_AT`` hook) and resumed; the result must equal the source row for row, with
no duplicate and nothing missing. Bad input gives one line and exit code 2, and never a
database at ``--out``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache.__main__ import main  # noqa: E402
from cache.db import open_database  # noqa: E402
from cache.paths import tmp_path as tmp_of  # noqa: E402
from engine.errors import MonitorError  # noqa: E402
from tests.conftest import new_pg_database  # noqa: E402
from tests.postgres_server import DESCRIPTIONS, PASSWORD, create_transluce_tables, fill_transluce  # noqa: E402
from tests.publisher_exports import neuronpedia_export, openai_dataset, write_jsonl_gz  # noqa: E402

pytestmark = pytest.mark.slow


def run_import(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MONITOR_IMPORT_KILL_AT", None)
    if kill_at:
        env["MONITOR_IMPORT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "cache", "import", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def one_line_error(capsys, argv: list[str], needle: str) -> str:
    """``python -m cache argv`` in-process: exit 2 and exactly one ``error:`` line containing ``needle``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in "\n".join(err)
    return lines[0]


def rows_of(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as c:
        return c.execute(sql).fetchall()


# --------------------------------------------------------------------------- Transluce: expectations
def expected_transluce(rows: dict, model: str) -> dict:
    """What an import of ``model`` (expert NULL) must hold, from the source rows (brute force)."""
    ours = {r[0]: (r[2], r[3]) for r in rows["neurons"] if r[1] == model and r[4] is None}
    best: dict = {}
    for r in rows[DESCRIPTIONS]:
        _id, nid, pol, version, desc, cleaned, summary, _vec, meta, _int = r
        if nid not in ours or pol not in (1, -1):
            continue
        score = meta.get("score") if isinstance(meta.get("score"), (int, float)) else None
        key = (*ours[nid], pol)
        rank = (score is None, -(score or 0.0), version is not None, version or "")
        if key not in best or rank < best[key][0]:
            best[key] = (rank, version, desc, cleaned, summary, score)
    descriptions, scores, missing = {}, {}, 0
    for key, (_, version, desc, cleaned, summary, score) in best.items():
        text = cleaned if cleaned and cleaned.strip() else desc
        if not (summary and summary.strip()):
            missing += 1
            summary = text
        descriptions[key] = (text, summary, score, "transluce" if version is None else f"transluce:{version}",
                             "transluce-simulation" if score is not None else None)
        if score is not None:
            scores[key] = score
    quantiles = {}
    for _id, nid, q in rows["quantiles"]:
        if nid in ours:
            for k, v in q.items():
                try:
                    quantiles[(*ours[nid], float(k))] = float(v)
                except ValueError:
                    pass
    exemplars: dict = {}
    for _id, nid, pol, text, value, rank in rows["exemplars"]:
        if nid in ours:
            exemplars.setdefault((*ours[nid], pol), []).append((rank, value, text))
    ex = {}
    for key, items in exemplars.items():
        for i, (_, value, text) in enumerate(sorted(items)):
            ex[(*key, i)] = (value, text)
    return {"descriptions": descriptions, "scores": scores, "quantiles": quantiles, "exemplars": ex,
            "missing_summaries": missing}


def check_transluce(path: Path, rows: dict, model: str) -> None:
    want = expected_transluce(rows, model)
    got = {(l, n, p): (t, s, sc, e, ss) for l, n, p, t, s, sc, e, ss in rows_of(
        path, "SELECT layer, neuron, polarity, text, summary, score, explainer, score_scorer FROM descriptions")}
    assert got == want["descriptions"]
    got_scores = rows_of(path, "SELECT layer, neuron, polarity, scorer, version, value, split, n, detail FROM scores")
    assert {(r[0], r[1], r[2]): r[5] for r in got_scores} == want["scores"]
    assert all(r[3] == "transluce-simulation" and r[4] == "launch_241020" and r[6] == "source" and r[7] is None
               and json.loads(r[8])["field"] == "description_metadata.score" for r in got_scores)
    got_q = {(l, n, q): v for l, n, q, v in rows_of(path, "SELECT layer, neuron, q, value FROM quantiles")}
    assert got_q.keys() == want["quantiles"].keys()
    assert all(math.isclose(got_q[k], v, rel_tol=1e-6) for k, v in want["quantiles"].items())  # FLOAT column
    got_ex = rows_of(path, "SELECT e.layer, e.neuron, e.polarity, e.rank, e.split, e.max_act, e.scale, e.acts, "
                           "s.text, s.tokens, s.source FROM exemplars e JOIN sequences s USING (seq_id)")
    assert len(got_ex) == len(want["exemplars"]) == len(rows_of(path, "SELECT * FROM sequences"))
    for l, n, p, r, split, max_act, scale, acts, text, tokens, source in got_ex:
        value, want_text = want["exemplars"][(l, n, p, r)]
        assert (split, scale, acts, tokens, source, text) == ("source", None, None, [], "transluce", want_text)
        assert math.isclose(max_act, value, rel_tol=1e-6)
    n_desc = len(want["descriptions"])
    assert rows_of(path, "SELECT count(*) FROM embeddings")[0][0] == n_desc
    with open_database(path) as db:
        meta = json.loads(db.meta["source"])
        assert meta["missing_summaries"] == want["missing_summaries"] > 0
        assert PASSWORD not in db.meta["source"] and PASSWORD not in db.meta["import_command"]
        assert db.engine_model == model and db.imported and db.version == "2"


@pytest.fixture(scope="module")
def transluce_src(pg_server):
    """A Transluce NeuronDB with every quirk (see fill_transluce) for 'test/llama-tiny'."""
    model = "test/llama-tiny"
    dsn = new_pg_database(pg_server, "quirks")
    with psycopg.connect(dsn, autocommit=True) as conn:
        vector = create_transluce_tables(conn)
        rows = fill_transluce(conn, model, 3, 24, exemplars=3, dim=32)
    return dsn, rows, model, vector


def test_transluce_killed_three_times_then_resumed_matches_the_source(transluce_src, tmp_path):
    dsn, rows, model, _ = transluce_src
    out = tmp_path / "t.duckdb"
    args = ["transluce", "--dsn", dsn, "--model", model, "--out", str(out), "--batch-size", "25", "--embed-chunk", "40"]
    for kill in ("descriptions:2", "exemplars:3", "embeddings:2"):
        res = run_import(*args, kill_at=kill)
        assert res.returncode == -9, res.stderr[-2000:]
        assert not out.exists() and tmp_of(out).exists()  # half-written: only the .tmp, never the output
        with pytest.raises(MonitorError, match="re-run the same `python -m cache import"):
            open_database(out)
    res = run_import(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.exists() and not tmp_of(out).exists()
    check_transluce(out, rows, model)
    # the same source imported in one go gives the same rows
    clean = tmp_path / "clean.duckdb"
    assert main(["import", "transluce", "--dsn", dsn, "--model", model, "--out", str(clean)]) == 0
    emb = "SELECT layer, neuron, polarity, vec FROM embeddings ORDER BY layer, neuron, polarity"
    resumed, fresh = rows_of(out, emb), rows_of(clean, emb)
    assert [r[:3] for r in resumed] == [r[:3] for r in fresh]  # every summary embedded once, none missing
    assert np.allclose(np.array([r[3] for r in resumed]), np.array([r[3] for r in fresh]), atol=1e-5)
    for table, key in (("descriptions", "layer, neuron, polarity"), ("scores", "layer, neuron, polarity, scorer"),
                       ("quantiles", "layer, neuron, q"), ("exemplars", "layer, neuron, polarity, rank")):
        cols = "*" if table != "exemplars" else "layer, neuron, polarity, split, rank, max_act"
        assert rows_of(out, f"SELECT {cols} FROM {table} ORDER BY {key}") == \
            rows_of(clean, f"SELECT {cols} FROM {table} ORDER BY {key}")


def test_transluce_search_finds_the_reembedded_summaries(tiny_transluce):
    from cache.embedder import embed

    path, rows, model = tiny_transluce
    with open_database(path) as db:
        summaries = dict(((l, n, p), s) for l, n, p, s in rows_of(path, "SELECT layer, neuron, polarity, summary "
                                                                        "FROM descriptions"))
        key = sorted(summaries)[7]
        hits = db.semantic_search(embed([summaries[key]])[0], k=50)
        assert key in list(zip(hits["layer"], hits["neuron"], hits["polarity"]))
        assert hits["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)  # a summary finds itself (or its twin)
        stored = db.embedding(*key)
        assert np.allclose(stored, embed([summaries[key]])[0], atol=1e-5)
        top = hits.iloc[0]
        assert isinstance(top["top_exemplar"], str) and top["top_exemplar"]  # rank-0 'source' exemplar text
        info = db.neuron(int(key[0]), int(key[1]))
        assert info["exemplars"] and all(e["acts"] is None and e["text"] for e in info["exemplars"])
        scores = db.scores_for(int(key[0]), int(key[1]))
        assert set(scores["scorer"]) <= {"transluce-simulation"} and set(scores["split"]) <= {"source"}


def test_steering_works_on_an_imported_database(tiny_transluce, tiny_lm):
    """Strengthen with the imported quantiles (Transluce's 1 − 1e-7 level) on the live model."""
    from concepts.resolve import resolve
    from dashboard.resources import browse_only_note, db_model_mismatch
    from engine.chat import render_chat
    from engine.specs import ConceptSpec
    from engine.trace import run_trace

    path, rows, model = tiny_transluce
    chat = [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}]
    with open_database(path) as db:
        assert db_model_mismatch(tiny_lm, db) is None and browse_only_note(db) is None
        r = resolve(db, [ConceptSpec("dates", mode="strengthen", k=6, strength=0.5, tokens="prompt")])
        qrows = {r_[0]: r_[2] for r_ in rows["quantiles"]}
        chosen = [(l, n, p) for iv in r.union.interventions for l, n, p in iv.neurons]
        assert chosen and all(iv.mode == "replace" and iv.strength == 0.5 for iv in r.union.interventions)
        for layer, neuron, pol in chosen:
            source_q = qrows[f"{model}_{layer}_{neuron}_None"]["0.9999999" if pol > 0 else "1e-07"]
            assert r.quantiles[pol][layer, neuron] == pytest.approx(source_q, rel=1e-6)
        n_tokens = len(render_chat(tiny_lm.tokenizer, chat))
        base = run_trace(tiny_lm, chat).activations
        steered = run_trace(tiny_lm, chat, interventions=r.union.interventions, quantiles=r.quantiles).activations
        for layer, neuron, pol in chosen:
            want = 0.5 * float(r.quantiles[pol][layer, neuron])
            assert np.allclose(steered[layer, :n_tokens, neuron].float().numpy(), want, rtol=1e-5)
            assert not np.allclose(base[layer, :n_tokens, neuron].float().numpy(), want, rtol=1e-5)


def test_transluce_bad_input_one_line_exit_2(transluce_src, pg_server, capsys, tmp_path):
    dsn, _rows, model, _ = transluce_src
    out = tmp_path / "bad.duckdb"
    base = ["import", "transluce", "--model", model, "--out", str(out)]
    port = dsn.split(":")[-1].split("/")[0]
    one_line_error(capsys, base + ["--dsn", dsn.replace(f":{port}/", ":1/")], "Could not connect to PostgreSQL")
    one_line_error(capsys, base + ["--dsn", dsn.replace(PASSWORD, "wrong")], "refused the password")
    one_line_error(capsys, base + ["--dsn", "postgresql://clarity@127.0.0.1:notaport/x"], "--dsn")
    one_line_error(capsys, base + ["--dsn", dsn, "--table", "descriptions_nope"], "no table descriptions_nope")
    one_line_error(capsys, ["import", "transluce", "--dsn", dsn, "--model", "meta-llama/Other", "--out", str(out)],
                   "no model 'meta-llama/Other' (it has: test/llama-tiny, test/llama-tiny-other)")
    one_line_error(capsys, base + ["--dsn", dsn, "--expert", "3"], "pass --expert")
    broken = new_pg_database(pg_server, "broken")
    with psycopg.connect(broken, autocommit=True) as conn:
        create_transluce_tables(conn)
        conn.execute("DROP TABLE exemplars")
    one_line_error(capsys, base + ["--dsn", broken], "no table exemplars")
    assert not out.exists() and not tmp_of(out).exists()  # nothing was written
    # an unfinished import of another source is never mixed into this one
    other = tmp_path / "other.duckdb"
    res = run_import("transluce", "--dsn", dsn, "--model", model, "--out", str(other), kill_at="descriptions:1")
    assert res.returncode == -9
    one_line_error(capsys, ["import", "transluce", "--dsn", dsn, "--model", "test/llama-tiny-other", "--out",
                            str(other)], "--fresh")
    one_line_error(capsys, ["import", "transluce", "--dsn", dsn, "--model", model, "--out", str(other), "--batch-size",
                            "0"], "--batch-size must be at least 1")


def test_the_vector_column_as_pgvector_prints_it_is_kept_on_request(transluce_src, tmp_path):
    dsn, rows, model, vector = transluce_src
    out = tmp_path / "keep.duckdb"
    assert main(["import", "transluce", "--dsn", dsn, "--model", model, "--out", str(out),
                 "--keep-source-embeddings", "--version", "v2"]) == 0
    want = {}
    for r in rows[DESCRIPTIONS]:
        if r[3] == "v2" and r[1].startswith(model + "_") and r[1].endswith("_None") and r[1].count("_") == 3:
            layer, neuron = (int(x) for x in r[1][len(model) + 1:].split("_")[:2])
            want[(layer, neuron, r[2])] = [float(x) for x in r[7].strip("[]").split(",")]
    got = {(l, n, p): list(v) for l, n, p, v in rows_of(out, "SELECT layer, neuron, polarity, vec FROM source_embeddings")}
    assert got.keys() == want.keys() and got and all(np.allclose(got[k], want[k]) for k in want)
    assert {e for (e,) in rows_of(out, "SELECT DISTINCT explainer FROM descriptions")} == {"transluce:v2"}


# --------------------------------------------------------------------------- Neuronpedia
def test_neuronpedia_round_trip_killed_and_resumed(tmp_path, capsys):
    from cache.codec import decode_acts
    from dashboard.resources import browse_only_note

    folder = neuronpedia_export(tmp_path)
    out = tmp_path / "np.duckdb"
    res = run_import("neuronpedia", str(folder), "--out", str(out), kill_at="activations:1")
    assert res.returncode == -9 and not out.exists()
    res = run_import("neuronpedia", str(folder), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    desc = {(l, n): (p, t, s, sc, e, ss) for l, n, p, t, s, sc, e, ss in rows_of(
        out, "SELECT layer, neuron, polarity, text, summary, score, explainer, score_scorer FROM descriptions")}
    ex = "neuronpedia:oai_token-act-pair/gpt-4o-mini"
    for layer in (0, 2):
        assert desc[(layer, 0)] == (1, f"dates in layer {layer}", f"dates in layer {layer}", 0.4, ex,
                                    "neuronpedia:recall_alt:gpt-4o-mini")
        assert desc[(layer, 1)] == (1, f"Bible verses L{layer}", f"Bible verses L{layer}", None, ex, None)
        assert desc[(layer, 2)][1] == f"decimal numbers L{layer}" and desc[(layer, 2)][3] == 0.7
        assert desc[(layer, 3)][3] == 0.3 and desc[(layer, 3)][5] == "neuronpedia:eleuther_fuzz:llama"
    assert len(desc) == 8  # the empty explanation is left out
    scores = rows_of(out, "SELECT layer, neuron, scorer, version, value, split FROM scores ORDER BY ALL")
    assert (0, 0, "neuronpedia:eleuther_fuzz:gpt-4o-mini", "gpt-4o-mini", 0.9, "source") in scores
    assert (2, 3, "neuronpedia:recall_alt:gpt-4o-mini", "gpt-4o-mini", None, "source") in scores
    assert not [s for s in scores if s[1] == 2 and s[4] == 0.1]  # the losing explanation's score is not kept
    assert len(scores) == 2 * 5
    neurons = rows_of(out, "SELECT layer, neuron, promotes, suppresses FROM neurons ORDER BY ALL")
    assert neurons[1] == (0, 1, [" up1", "x"], [" down1"]) and len(neurons) == 12
    q = rows_of(out, "SELECT layer, neuron, q, value FROM quantiles ORDER BY ALL")
    assert q[0] == (0, 0, 1.0, 3.0) and q[-1] == (2, 5, 1.0, 10.0) and len(q) == 12
    exs = rows_of(out, "SELECT e.layer, e.neuron, e.rank, e.split, e.max_act, e.scale, e.acts, s.tokens, s.source, "
                       "s.text FROM exemplars e JOIN sequences s USING (seq_id) ORDER BY ALL")
    assert len(exs) == 2 * 4 * 3
    for layer, neuron, rank, split, max_act, scale, acts, tokens, source, text in exs:
        j = 2 - rank  # ranked by maxValue, highest first
        vals = [0.0, (j + 1) * (neuron + 1) * 0.5, -0.25 * j, 0.1 * layer]
        assert split == "source" and max_act == pytest.approx(max(vals))
        assert np.allclose(decode_acts(np.asarray(acts, np.int8), scale), vals, atol=scale / 254 + 1e-7)
        assert tokens == ["<bos>", " the", f" tok{j}", "\n"] and text == "".join(tokens)
        assert source == ("pile" if j else f"{layer}-mlp-test")
    with open_database(out) as db:
        assert (db.n_layers, db.n_neurons, db.model_id) == (4, 8, "llama-np")
        assert db.engine_model is None and "browsing only" in browse_only_note(db)
        assert "negative_polarity" in json.loads(db.meta["lacks"])
        assert db.nearest_quantile(1e-5) is None and np.isnan(db.quantile_table(1e-5)).all()
        assert db.quantile_table(1 - 1e-5)[0, 0] == 3.0
    # --engine-model makes it live; --model must match the export
    live = tmp_path / "live.duckdb"
    assert main(["import", "neuronpedia", str(folder / "2-mlp-test"), "--engine-model", "meta-llama/x",
                 "--out", str(live)]) == 0
    with open_database(live) as db:
        assert db.engine_model == "meta-llama/x" and db.n_layers == 4
        assert rows_of(live, "SELECT DISTINCT layer FROM descriptions") == [(2,)]
    one_line_error(capsys, ["import", "neuronpedia", str(folder), "--model", "gpt2-small", "--out",
                            str(tmp_path / "x.duckdb")], "is an export of model 'llama-np', not 'gpt2-small'")


def test_neuronpedia_corrupt_file_is_one_line_and_resumable(tmp_path, capsys):
    folder = neuronpedia_export(tmp_path)
    bad = folder / "2-mlp-test" / "activations" / "batch-1.jsonl.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated download
    out = tmp_path / "np.duckdb"
    one_line_error(capsys, ["import", "neuronpedia", str(folder), "--out", str(out)], "batch-1.jsonl.gz is corrupt")
    assert not out.exists() and tmp_of(out).exists()
    done = rows_of(tmp_of(out), "SELECT count(*) FROM _import_progress WHERE key LIKE 'file:%'")[0][0]
    assert done == 4 + 4 + 3  # every file before the bad one is committed
    bad.write_bytes(good)  # the user downloads it again
    assert main(["import", "neuronpedia", str(folder), "--out", str(out)]) == 0
    clean = tmp_path / "clean.duckdb"
    assert main(["import", "neuronpedia", str(folder), "--out", str(clean)]) == 0
    for table in ("descriptions", "scores", "neurons", "quantiles"):
        assert rows_of(out, f"SELECT * FROM {table} ORDER BY ALL") == rows_of(clean, f"SELECT * FROM {table} ORDER BY ALL")
    sel = "SELECT layer, neuron, rank, max_act, acts FROM exemplars ORDER BY ALL"
    assert rows_of(out, sel) == rows_of(clean, sel)
    row = json.loads(gzip.decompress(good).decode().splitlines()[0])
    row["modelId"] = "someone-else"
    write_jsonl_gz(bad, [row])
    one_line_error(capsys, ["import", "neuronpedia", str(folder), "--out", str(tmp_path / "m.duckdb")],
                   "is of model 'someone-else', not 'llama-np'")


# --------------------------------------------------------------------------- OpenAI
def test_openai_round_trip_and_browse_only(tmp_path, capsys):
    from cache.codec import decode_acts
    from dashboard.resources import browse_only_note

    folder, truth = openai_dataset(tmp_path)
    out = tmp_path / "gpt2.duckdb"
    res = run_import("openai", str(folder), "--out", str(out), "--batch-size", "2", kill_at="neurons:2")
    assert res.returncode == -9
    res = run_import("openai", str(folder), "--out", str(out), "--batch-size", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    desc = {(l, n): (t, s, sc, ss) for l, n, p, t, s, sc, ss in rows_of(
        out, "SELECT layer, neuron, polarity, text, summary, score, score_scorer FROM descriptions")}
    assert set(desc) == set(truth) - {(1, 0)}
    assert desc[(0, 0)] == ("words about topic 0-0", "words about topic 0-0", 0.2, "openai-ev-correlation")
    assert desc[(0, 1)] == ("a better one 0", "a better one 0", 0.8, "openai-ev-correlation")
    assert desc[(1, 2)] == ("words about topic 1-2", "words about topic 1-2", None, None)
    scores = {(l, n, s): (v, sp, k) for l, n, s, v, sp, k in rows_of(
        out, "SELECT layer, neuron, scorer, value, split, n FROM scores")}
    assert scores[(0, 0, "openai-ev-correlation")] == (0.2, "source", 4)
    assert scores[(0, 0, "openai-absolute-dev-explained")] == (None, "source", 4)  # JSON null: no prediction
    assert scores[(0, 1, "openai-rsquared")] == (0.6, "source", 5)
    assert (0, 1, "openai-absolute-dev-explained") not in scores  # absent in the published row
    assert scores[(1, 2, "openai-ev-correlation")] == (None, "source", 6)
    exs = rows_of(out, "SELECT e.layer, e.neuron, e.polarity, e.split, e.rank, e.max_act, e.scale, e.acts, s.tokens "
                       "FROM exemplars e JOIN sequences s USING (seq_id) ORDER BY ALL")
    assert len(exs) == 6 * 5
    for layer, neuron, pol, split, rank, max_act, scale, acts, tokens in exs:
        top, rnd, _ = truth[(layer, neuron)]
        rec = top[rank] if pol == 1 else rnd[rank]
        assert split == ("source" if pol == 1 else "random") and tokens == rec["tokens"]
        assert max_act == pytest.approx(max(rec["activations"]))
        assert np.allclose(decode_acts(np.asarray(acts, np.int8), scale), rec["activations"], atol=scale / 254 + 1e-7)
    q = dict(((l, n), v) for l, n, _q, v in rows_of(out, "SELECT layer, neuron, q, value FROM quantiles"))
    assert q[(1, 2)] == pytest.approx(3.0) and len(q) == 6
    with open_database(out) as db:
        assert db.engine_model is None and "GPT-2 XL is not a Llama" in browse_only_note(db)
        assert (db.n_layers, db.n_neurons, db.model_id) == (2, 3, "gpt2-xl")
        hit = db.keyword_search("better one", k=5)
        assert list(hit["neuron"]) == [1, 1]
    misplaced = folder / "collated-activations" / "0" / "2.json"
    data = json.loads(misplaced.read_text())
    data["neuron_id"]["neuron_index"] = 7
    misplaced.write_text(json.dumps(data))
    one_line_error(capsys, ["import", "openai", str(folder), "--out", str(tmp_path / "y.duckdb")],
                   "says it is neuron 0/7 but sits at 0/2")
    misplaced.write_text("{not json")
    one_line_error(capsys, ["import", "openai", str(folder), "--out", str(tmp_path / "y.duckdb"), "--fresh"],
                   "2.json is corrupt")
    one_line_error(capsys, ["import", "openai", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z.duckdb")],
                   "is not a folder")
    one_line_error(capsys, ["import", "openai", str(folder), "--out", str(out)], "already exists: pass --force")
