"""Import Transluce's NeuronDB (the Postgres + pgvector database behind their Monitor).

Transluce published its Llama-3.1-8B-Instruct descriptions only as a Docker image,
``mengkluce/neurondb-llama-3.1-8b-instruct`` (user ``clarity``, password ``sysadmin``,
database ``neurons``). Its tables, as defined in ``lib/neurondb/neurondb/schemas/tables.py``
of TransluceAI/observatory:

* ``language_models(id)``: Hugging Face model ids;
* ``neurons(id, model_id, layer, neuron, expert)``, ``id = f"{model_id}_{layer}_{neuron}_{expert}"``
  (``expert`` is NULL for a dense model, so ids end in ``_None``);
* ``descriptions_launch_241020(id, neuron_id, polarity, version, description,
  description_cleaned, description_summary, description_embedding vector(1536),
  description_metadata JSONB, is_interesting)``; the simulation score is
  ``description_metadata['score']``;
* ``quantiles(id, neuron_id, quantiles JSONB)``: keys are quantile levels as strings
  (``"0.9999999"``, ``"1e-07"``, ``"0.99999"``, ``"1e-05"``, …);
* ``exemplars(id, neuron_id, polarity, text, activation_value, rank)``: text and the peak
  value, no per-token activations.

What is imported, row for row (joined to ``neurons`` on ``neuron_id = neurons.id``, for the
``--model`` and ``--expert`` chosen):

* descriptions (polarity ±1): ``text`` = ``description_cleaned`` (``description`` when that is
  empty), ``summary`` = ``description_summary`` (the text when missing), ``score`` =
  ``description_metadata.score`` when it is a number, ``explainer`` = ``transluce:<version>``.
  Where several versions describe one (neuron, polarity), the best-scoring one is kept
  (``DISTINCT ON`` in Postgres; ``--version`` picks one instead);
* scores: one ``transluce-simulation`` row per scored description, split ``source``;
* quantiles: every numeric level in ``quantiles.quantiles``;
* exemplars: split ``source``, rank = position in the source's rank order (0 = first),
  ``max_act`` = ``activation_value``, no ``acts``; each text becomes a ``sequences`` row;
* the 1,536-d ``description_embedding`` (OpenAI text-embedding-ada-002, which a query would need
  the paid API for) only with ``--keep-source-embeddings``, into ``source_embeddings``; search
  uses the project's embedder on the summaries instead.

Every query runs on a server-side cursor (``psycopg`` named cursor) ordered by the key, so rows
stream in batches and a resumed import continues after the last committed key. Postgres sorts
the joined rows once per table (it needs temporary disk space for that).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from engine.errors import MonitorError

from ..writer import ARROW_SCHEMAS
from .job import ImportJob, frame, import_command

NAME = "transluce"
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_TABLE = "descriptions_launch_241020"
SCORER = "transluce-simulation"
URL = "https://github.com/TransluceAI/observatory"
IMAGE = "mengkluce/neurondb-llama-3.1-8b-instruct"
LICENCE = "not stated for the data (the observatory code is MIT): check with Transluce before redistributing"
REQUIRED_TABLES = ("language_models", "neurons", "quantiles", "exemplars")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The score as a float when description_metadata.score is a JSON number, else NULL.
_SCORE = ("CASE WHEN jsonb_typeof(d.description_metadata -> 'score') = 'number' "
          "THEN (d.description_metadata ->> 'score')::float8 END")


def add_arguments(p) -> None:
    p.add_argument("--dsn", required=True, help="PostgreSQL URL, e.g. postgresql://clarity:sysadmin@localhost:5432/neurons")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the language_models.id to import (default {DEFAULT_MODEL})")
    p.add_argument("--table", default=DEFAULT_TABLE, help=f"the descriptions table (default {DEFAULT_TABLE})")
    p.add_argument("--version", default=None, help="import only descriptions of this version (default: the "
                                                    "best-scoring version of each neuron and polarity)")
    p.add_argument("--expert", type=int, default=None, help="the neurons.expert to import (default NULL: a dense model)")
    p.add_argument("--keep-source-embeddings", action="store_true",
                   help="also store the published 1,536-d description embeddings (table source_embeddings)")


def redact(dsn: str) -> str:
    """The DSN without its password (for meta and messages)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - an unparsable DSN is reported by connect()
        return "(unparsable DSN)"
    parts.pop("password", None)
    host, port, db, user = (parts.get(k) for k in ("host", "port", "dbname", "user"))
    if dsn.startswith(("postgresql://", "postgres://")):
        return f"postgresql://{user + '@' if user else ''}{host or ''}{':' + str(port) if port else ''}/{db or ''}"
    return make_conninfo(**parts)


def connect(dsn: str):
    """A psycopg connection, or MonitorError saying what is wrong with ``--dsn``."""
    import psycopg

    where = redact(dsn)
    try:
        return psycopg.connect(dsn, connect_timeout=10, application_name="neuron-monitor-import", autocommit=True)
    except psycopg.ProgrammingError as err:  # the DSN itself is malformed
        raise MonitorError(f"--dsn is not a valid PostgreSQL URL ({_first(err)}): use "
                           "postgresql://USER:PASSWORD@HOST:PORT/DATABASE.") from err
    except psycopg.OperationalError as err:
        text = str(err)
        if "password authentication failed" in text or "no password supplied" in text:
            raise MonitorError(f"PostgreSQL at {where} refused the password: check the password in --dsn (Transluce's "
                               "image uses clarity:sysadmin).") from err
        if re.search(r'database "[^"]+" does not exist', text) or re.search(r'role "[^"]+" does not exist', text):
            raise MonitorError(f"PostgreSQL at {where} says {_first(err)}: fix the user or database in --dsn "
                               "(Transluce's image: user clarity, database neurons).") from err
        raise MonitorError(f"Could not connect to PostgreSQL at {where} ({_first(err)}): is the server running? "
                           f"(e.g. `docker run -d -p 5432:5432 {IMAGE}`), and are host and port in --dsn right?") from err


def _first(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines and lines[0].startswith("connection failed") and len(lines) > 1 else (
        lines[0] if lines else type(err).__name__)


class TransluceSource:
    """A checked connection to a Transluce NeuronDB for one model (and expert)."""

    def __init__(self, dsn: str, model: str, table: str, version: str | None, expert: int | None):
        if not _IDENT.match(table):
            raise MonitorError(f"--table {table!r} is not a plain table name: use e.g. {DEFAULT_TABLE}.")
        self.dsn, self.model, self.table, self.version, self.expert = dsn, model, table, version, expert
        self.conn = connect(dsn)
        try:
            self._check()
        except BaseException:
            self.conn.close()
            raise

    def _query(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        import psycopg

        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        except psycopg.Error as err:
            raise MonitorError(f"The source database rejected a query ({_first(err)}): is it a Transluce NeuronDB "
                               f"with the tables {', '.join(REQUIRED_TABLES + (self.table,))}?") from err

    def _check(self) -> None:
        tables = {r[0] for r in self._query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ANY(current_schemas(false))")}
        missing = [t for t in REQUIRED_TABLES + (self.table,) if t not in tables]
        if missing:
            desc = sorted(t for t in tables if t.startswith("descriptions"))
            hint = (f" (descriptions tables there: {', '.join(desc)}; pick one with --table)" if desc and self.table in missing
                    else "")
            raise MonitorError(f"The source database has no table {', '.join(missing)}{hint}: point --dsn at "
                               "Transluce's NeuronDB.")
        models = [r[0] for r in self._query("SELECT id FROM language_models ORDER BY id")]
        if self.model not in models:
            raise MonitorError(f"The source has no model {self.model!r} (it has: {', '.join(models) or 'none'}): "
                               "pass --model with one of them.")
        shape = self._query("SELECT max(layer) + 1, max(neuron) + 1, count(*) FROM neurons "
                            "WHERE model_id = %s AND expert IS NOT DISTINCT FROM %s", [self.model, self.expert])[0]
        if not shape[2]:
            experts = [r[0] for r in self._query("SELECT DISTINCT expert FROM neurons WHERE model_id = %s "
                                                 "ORDER BY expert NULLS FIRST LIMIT 10", [self.model])]
            raise MonitorError(f"The source has no neurons of {self.model} with expert "
                               f"{'NULL' if self.expert is None else self.expert} (experts there: "
                               f"{', '.join('NULL' if e is None else str(e) for e in experts) or 'none'}): pass --expert.")
        self.n_layers, self.n_neurons, self.n_neurons_total = int(shape[0]), int(shape[1]), int(shape[2])
        self.skipped_experts = int(self._query(
            "SELECT count(*) FROM neurons WHERE model_id = %s AND expert IS DISTINCT FROM %s",
            [self.model, self.expert])[0][0])
        if self.version is not None:
            n = self._query(f"SELECT count(*) FROM {self.table} WHERE version IS NOT DISTINCT FROM %s", [self.version])
            if not n[0][0]:
                seen = [r[0] for r in self._query(f"SELECT DISTINCT version FROM {self.table} LIMIT 10")]
                raise MonitorError(f"{self.table} has no descriptions of version {self.version!r} (versions there: "
                                   f"{', '.join(map(str, seen))}): pass another --version, or none.")

    def count(self, table: str) -> int:
        """Rows of ``table`` for this model and expert (for the progress bars)."""
        return int(self._query(f"SELECT count(*) FROM {table} x JOIN neurons n ON n.id = x.neuron_id "
                               "WHERE n.model_id = %s AND n.expert IS NOT DISTINCT FROM %s",
                               [self.model, self.expert])[0][0])

    def stream(self, sql: str, params: list, batch: int):
        """Yield lists of up to ``batch`` rows of ``sql`` from a server-side cursor."""
        import psycopg

        try:
            with self.conn.transaction(), self.conn.cursor(name="neuron_monitor_import") as cur:
                cur.itersize = batch
                cur.execute(sql, params)
                while True:
                    rows = cur.fetchmany(batch)
                    if not rows:
                        break
                    yield rows
        except psycopg.Error as err:
            raise MonitorError(f"Reading the source failed ({_first(err)}): rerun the same command to resume "
                               "once the server is back.") from err

    def _where(self, alias: str = "n") -> tuple[str, list]:
        return (f"{alias}.model_id = %s AND {alias}.expert IS NOT DISTINCT FROM %s", [self.model, self.expert])

    def close(self) -> None:
        self.conn.close()


def _after(key_cols: str, position: list | None) -> tuple[str, list]:
    """``AND (cols) > (position)`` for a resumed stream (nothing at the start)."""
    if position is None:
        return "", []
    return f" AND ({key_cols}) > ({', '.join(['%s'] * len(position))})", list(position)


def _parse_vector(text: str | None) -> list[float] | None:
    """pgvector's text form ``[0.1,0.2,…]`` → floats (None for NULL)."""
    if text is None:
        return None
    return [float(x) for x in text.strip().strip("[]").split(",") if x.strip()]


def _quantile_rows(layer: int, neuron: int, raw: Any) -> tuple[list[tuple], int]:
    """(rows ``(layer, neuron, q, value)`` of every numeric level in [0, 1], count skipped)."""
    data = raw if isinstance(raw, dict) else json.loads(raw) if raw else {}
    rows, skipped = [], 0
    for key, value in (data.items() if isinstance(data, dict) else []):
        try:
            q, v = float(key), float(value)
        except (TypeError, ValueError):
            skipped += 1
            continue
        if 0.0 <= q <= 1.0 and math.isfinite(v):
            rows.append((layer, neuron, q, v))
        else:
            skipped += 1
    return rows, skipped


def run(args, out, progress: bool = True, rows_only: bool = False) -> "Path | None":
    """``python -m cache import transluce``: see the module docstring. ``rows_only`` stops before embedding and
    finishing (the benchmark times the row import with it)."""
    from engine.loader import model_slug

    src = TransluceSource(args.dsn, args.model, args.table, args.version, args.expert)
    keep = bool(args.keep_source_embeddings)
    try:
        dim = None
        if keep:
            first = src._query(f"SELECT description_embedding::text FROM {args.table} "
                               "WHERE description_embedding IS NOT NULL LIMIT 1")
            dim = len(_parse_vector(first[0][0])) if first else None
        job = ImportJob(out, {"source": NAME, "location": redact(args.dsn), "model": args.model, "table": args.table,
                              "version": args.version, "expert": args.expert, "keep_source_embeddings": keep},
                        embedder=args.embedder, fresh=args.fresh, force=args.force, progress=progress,
                        embed_chunk=args.embed_chunk,
                        source_embedding_dim=dim)
        try:
            stats = {
                "descriptions": _descriptions(src, job, args.batch_size, keep),
                "quantiles": _quantiles(src, job, args.batch_size),
                "exemplars": _exemplars(src, job, args.batch_size),
            }
            if rows_only:
                return None
            job.embed_summaries()
            words = ["python", "-m", "cache", "import", NAME, "--dsn", redact(args.dsn), "--model", args.model,
                     "--out", str(out)]
            if args.table != DEFAULT_TABLE:
                words += ["--table", args.table]
            if args.version is not None:
                words += ["--version", args.version]
            if args.expert is not None:
                words += ["--expert", str(args.expert)]
            versions = stats["descriptions"].pop("versions")
            return job.finish({
                "model_id": args.model, "model_slug": model_slug(args.model),
                "n_layers": str(src.n_layers), "n_neurons": str(src.n_neurons),
                "explainer": f"transluce ({args.table})", "scorer": SCORER,
                "scorers": json.dumps([{"name": SCORER, "version": _scorer_version(args.table),
                                        "description": "Transluce's simulation score as published "
                                                       "(description_metadata.score): correlation between true and "
                                                       "simulated activations, by their own simulator"}]),
                "source": json.dumps({
                    "name": NAME, "format": "Transluce NeuronDB", "location": redact(args.dsn), "url": URL,
                    "image": IMAGE, "licence": LICENCE, "version": args.table,
                    "tables": {"descriptions": args.table, "neurons": "neurons", "quantiles": "quantiles",
                               "exemplars": "exemplars"},
                    "description_versions": versions, "expert": args.expert,
                    "rows": {k: v["rows"] for k, v in stats.items()},
                    "skipped": {"neurons_of_other_experts": src.skipped_experts,
                                **{f"{k}_{r}": n for k, v in stats.items() for r, n in v.get("skipped", {}).items()}},
                    "missing_summaries": stats["descriptions"]["missing_summaries"],
                    "source_embeddings": "kept in source_embeddings" if keep else "not kept (re-embedded)",
                }),
                "lacks": json.dumps(["per_token_activations", "output_tokens", "random_exemplars", "corpus"]),
                "engine_model": args.model, "live_note": "",
                "import_command": import_command(words),
            })
        finally:
            job.close()
    finally:
        src.close()


def _scorer_version(table: str) -> str:
    """``descriptions_launch_241020`` → ``launch_241020``: the release the scores came with."""
    return table.removeprefix("descriptions_") or table


def _stream_step(src: TransluceSource, job: ImportJob, step: str, batch: int, *, initial: dict, key: str,
                 select: str, convert, extra_where: str = "", extra_params: tuple = ()) -> dict:
    """Stream one table in ``key`` order and commit each batch with its last key.

    ``select`` is the query with ``{where}`` where the model/expert filter, ``extra_where`` and
    the resume condition (``key`` after the last committed one) go; ``convert(rows, state)``
    turns a batch into the ``write(writer)`` that stores it, updating ``state`` (kept with the
    position, so counts survive a resume). Returns the final state."""
    if job.done(step):
        return job.info(step)
    pos = job.position(step)
    state = pos["state"] if pos else {"rows": 0, **initial}
    where, params = src._where()
    after, after_params = _after(key, pos["key"] if pos else None)
    sql = select.format(where=where + extra_where + after)
    n_key = len(key.split(","))
    with job.bar(None, step, initial=state["rows"]) as bar:
        for rows in src.stream(sql, params + list(extra_params) + after_params, batch):
            write = convert(rows, state)
            state["rows"] += len(rows)
            job.commit(step, {"key": list(rows[-1][:n_key]), "state": state}, write)
            bar.update(len(rows))
    job.mark_done(step, state)
    return state


def _descriptions(src: TransluceSource, job: ImportJob, batch: int, keep: bool) -> dict:
    embedding = ", d.description_embedding::text" if keep else ""
    select = (f"SELECT DISTINCT ON (n.layer, n.neuron, d.polarity) n.layer, n.neuron, d.polarity, d.version, "
              f"d.description, d.description_cleaned, d.description_summary, {_SCORE} AS score{embedding} "
              f"FROM {src.table} d JOIN neurons n ON n.id = d.neuron_id WHERE {{where}} "
              "ORDER BY n.layer, n.neuron, d.polarity, score DESC NULLS LAST, d.version NULLS FIRST")
    extra, extra_params = " AND d.polarity IN (1, -1)", ()
    if src.version is not None:
        extra, extra_params = extra + " AND d.version IS NOT DISTINCT FROM %s", (src.version,)

    def convert(rows, state):
        desc, scores, vecs = [], [], []
        for r in rows:
            layer, neuron, pol, version, description, cleaned, summary, score = r[:8]
            text = cleaned if cleaned and cleaned.strip() else description
            if not (summary and summary.strip()):
                state["missing_summaries"] += 1
                summary = text
            vkey = "NULL" if version is None else str(version)
            state["versions"][vkey] = state["versions"].get(vkey, 0) + 1
            desc.append((layer, neuron, pol, text, summary, score, f"transluce:{vkey}" if version is not None
                         else "transluce", SCORER if score is not None else None))
            if score is not None:
                scores.append((layer, neuron, pol, SCORER, _scorer_version(src.table), score, "source", None,
                               json.dumps({"source": NAME, "table": src.table, "field": "description_metadata.score",
                                           "version": version})))
            if keep and r[8] is not None:
                vecs.append((layer, neuron, pol, _parse_vector(r[8])))

        def write(w):
            w.write_descriptions(frame(desc, ARROW_SCHEMAS["descriptions"].names))
            w.write_scores(frame(scores, ARROW_SCHEMAS["scores"].names))
            if vecs:
                w.conn.register("_vecs", frame(vecs, ("layer", "neuron", "polarity", "vec")))
                w.conn.execute("INSERT INTO source_embeddings SELECT layer, neuron, polarity, vec FROM _vecs")
                w.conn.unregister("_vecs")
        return write

    return _stream_step(src, job, "descriptions", batch, initial={"missing_summaries": 0, "versions": {}},
                        key="n.layer, n.neuron, d.polarity", select=select, convert=convert, extra_where=extra,
                        extra_params=extra_params)


def _quantiles(src: TransluceSource, job: ImportJob, batch: int) -> dict:
    def convert(rows, state):
        out = []
        for layer, neuron, raw in rows:
            got, skipped = _quantile_rows(layer, neuron, raw)
            out += got
            state["skipped"]["levels"] += skipped
        return lambda w: w.write_quantiles(frame(out, ("layer", "neuron", "q", "value")))

    return _stream_step(src, job, "quantiles", batch, initial={"skipped": {"levels": 0}}, key="n.layer, n.neuron",
                        select="SELECT n.layer, n.neuron, q.quantiles FROM quantiles q JOIN neurons n "
                               "ON n.id = q.neuron_id WHERE {where} ORDER BY n.layer, n.neuron", convert=convert)


def _exemplars(src: TransluceSource, job: ImportJob, batch: int) -> dict:
    next_seq = [job.next_seq_id()]

    def convert(rows, state):
        ex, seqs = [], []
        for layer, neuron, pol, _rank, _id, value, text in rows:
            group = [layer, neuron, pol]
            if group != state["group"]:
                state["group"], state["next_rank"] = group, 0
            ex.append((layer, neuron, pol, "source", state["next_rank"], next_seq[0], value, None, None))
            seqs.append((next_seq[0], NAME, text if text is not None else "", []))
            state["next_rank"] += 1
            next_seq[0] += 1

        def write(w):
            w.write_sequences(frame(seqs, ("seq_id", "source", "text", "tokens")))
            w.write_exemplars(frame(ex, ARROW_SCHEMAS["exemplars"].names))
        return write

    return _stream_step(src, job, "exemplars", batch, initial={"group": None, "next_rank": 0},
                        key="n.layer, n.neuron, e.polarity, e.rank, e.id",
                        select="SELECT n.layer, n.neuron, e.polarity, e.rank, e.id, e.activation_value, e.text "
                               "FROM exemplars e JOIN neurons n ON n.id = e.neuron_id WHERE {where} "
                               "ORDER BY n.layer, n.neuron, e.polarity, e.rank, e.id",
                        convert=convert, extra_where=" AND e.polarity IN (1, -1)")
