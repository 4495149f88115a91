"""A throwaway PostgreSQL server, and a Transluce NeuronDB written into it (tests and the benchmark).

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` (PostgreSQL 15 from Debian's
``postgresql`` package, which ``make test`` installs) in a temporary folder, on a free
localhost port, with password authentication over TCP for the user ``clarity``, as in
Transluce's image. As root it runs them as the ``postgres`` system user (``initdb`` refuses
root). :func:`create_transluce_tables` creates the tables of Transluce's
``lib/neurondb/neurondb/schemas/tables.py``; ``description_embedding`` is ``vector(1536)``
when the pgvector extension is installed, else ``text`` holding pgvector's text form
(``[0.1,0.2,…]``), which is what the importer reads either way (``::text``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER, PASSWORD, DATABASE = "clarity", "sysadmin", "neurons"
DESCRIPTIONS = "descriptions_launch_241020"


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (PATH, else Debian's /usr/lib/postgresql/<v>/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make postgres` "
                       "(apt-get install postgresql) and rerun.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``with PostgresServer() as pg: pg.dsn`` → a running server; stopped and deleted on exit."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="monitor-pg-"))
        self.port = _free_port()
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        self.dsn = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *cmd: str) -> None:
        if self.as_root:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")

    def start(self) -> "PostgresServer":
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o700)
            for p in (self.root, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60",
                  "start")
        import psycopg

        with psycopg.connect(self.dsn.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def create_transluce_tables(conn, descriptions: str = DESCRIPTIONS) -> bool:
    """Transluce's tables (module docstring); returns whether the real ``vector`` type was used."""
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        vector = True
    except Exception:  # noqa: BLE001 - pgvector is not installed: fall back to its text form
        vector = False
    emb = "vector(1536)" if vector else "text"
    conn.execute("CREATE TABLE language_models (id varchar(255) PRIMARY KEY)")
    conn.execute("CREATE TABLE neurons (id varchar(255) PRIMARY KEY, model_id varchar(255) NOT NULL "
                 "REFERENCES language_models(id), layer integer NOT NULL, neuron integer NOT NULL, expert integer)")
    conn.execute(f"CREATE TABLE {descriptions} (id varchar(255) PRIMARY KEY, neuron_id varchar(255) NOT NULL "
                 "REFERENCES neurons(id), polarity integer NOT NULL, version text, description text NOT NULL, "
                 f"description_cleaned text, description_summary text, description_embedding {emb} NOT NULL, "
                 "description_metadata jsonb, is_interesting boolean)")
    conn.execute("CREATE TABLE quantiles (id varchar(255) PRIMARY KEY, neuron_id varchar(255) NOT NULL "
                 "REFERENCES neurons(id), quantiles jsonb NOT NULL)")
    conn.execute("CREATE TABLE exemplars (id varchar(255) PRIMARY KEY, neuron_id varchar(255) NOT NULL "
                 "REFERENCES neurons(id), polarity integer NOT NULL, text text NOT NULL, "
                 "activation_value float8 NOT NULL, rank integer NOT NULL)")
    return vector


def neuron_id(model: str, layer: int, neuron: int, expert: int | None) -> str:
    """Transluce's ``get_sqla_neuron_id``: ``f"{model_id}_{layer}_{neuron}_{expert}"``."""
    return f"{model}_{layer}_{neuron}_{expert}"


def vector_text(vec) -> str:
    """pgvector's text form of a vector."""
    return "[" + ",".join(repr(float(x)) for x in vec) + "]"


def copy_rows(conn, table: str, columns: tuple[str, ...], rows) -> None:
    """COPY ``rows`` (tuples; dicts become JSON) into ``table``."""
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
        for r in rows:
            cp.write_row([json.dumps(v) if isinstance(v, dict) else v for v in r])


QUANTILE_KEYS = ("0.9999999", "1e-07", "0.99999", "1e-05", "0.9999", "0.0001")


def fill_transluce(conn, model: str, n_layers: int, n_neurons: int, *, exemplars: int = 3, seed: int = 0,
                   quirks: bool = True, dim: int = 1536, vector: bool = False) -> dict[str, list[tuple]]:
    """Write a Transluce NeuronDB for ``model`` (``n_layers × n_neurons``) and return its rows by table.

    Every neuron gets both polarities, ``exemplars`` exemplars per polarity and the quantile
    keys Transluce's code reads. With ``quirks``: some neurons describe one polarity only; some
    summaries are NULL or blank and some cleaned descriptions NULL; the score is missing or a
    string for some; a few (neuron, polarity) have two versions with different scores;
    descriptions of polarity 0; neurons of other experts (0 and 7) and of another model; a
    quantile key that is not a level; exemplar ranks with gaps; texts with quotes, newlines and
    non-ASCII characters.
    """
    import random

    rnd = random.Random(seed)
    rows: dict[str, list[tuple]] = {"language_models": [(model,)], "neurons": [], DESCRIPTIONS: [], "quantiles": [],
                                    "exemplars": []}
    other = model + "-other"
    if quirks:
        rows["language_models"].append((other,))
    vec = vector_text([0.0] * (dim - 1) + [1.0]) if dim else "[]"
    words = ["dates", "Bible verses", "version numbers", "decimals", "code", "chat", "quotes \"x\"", "naïve café"]

    def add_neuron(m, layer, neuron, expert):
        nid = neuron_id(m, layer, neuron, expert)
        rows["neurons"].append((nid, m, layer, neuron, expert))
        return nid

    for layer in range(n_layers):
        for neuron in range(n_neurons):
            nid = add_neuron(model, layer, neuron, None)
            pols = (1, -1) if not quirks or (layer * n_neurons + neuron) % 7 else (1,)
            for pol in pols:
                topic = rnd.choice(words)
                versions = [None, "v2"] if quirks and (layer + neuron) % 11 == 0 else [None]
                for version in versions:
                    k = rnd.random()
                    meta: dict = {"score": round(rnd.uniform(-0.2, 0.9), 4), "n_samples": 50}
                    summary: str | None = f"{topic} (L{layer} N{neuron} {pol:+d})"
                    cleaned: str | None = f"Fires on {topic} in layer {layer}, neuron {neuron}, side {pol:+d}"
                    if quirks:
                        if k < 0.08:
                            meta.pop("score")
                        elif k < 0.1:
                            meta["score"] = "0.5"
                        if 0.1 <= k < 0.18:
                            summary = None
                        elif 0.18 <= k < 0.22:
                            summary = "  "
                        if 0.22 <= k < 0.3:
                            cleaned = None
                    own = vector_text([layer, neuron, pol, k] + [0.0] * (dim - 4)) if dim >= 4 else vec
                    rows[DESCRIPTIONS].append((f"{nid}_{pol}_{version}", nid, pol, version,
                                               f"[raw] {topic}\nline two, L{layer}/{neuron}/{pol}/{version}", cleaned,
                                               summary, own, meta, rnd.random() < 0.5))
                gap = 3 if quirks and neuron % 5 == 0 else 1
                for r in range(exemplars):
                    value = pol * (10.0 - r) * (1 + layer + neuron / 100)
                    rows["exemplars"].append((f"{nid}_{pol}_{r * gap}", nid, pol,
                                              f"exemplar {r} of {layer}/{neuron} {pol:+d}: {topic} «ok» it's\n",
                                              value, r * gap))
            q = {key: (1 if float(key) > 0.5 else -1) * (1 + layer + neuron / 10) * (2 - float(key) * 0.5)
                 for key in QUANTILE_KEYS}
            if quirks and neuron == 0:
                q["max"] = 3.0
            rows["quantiles"].append((nid, nid, q))
            if quirks and neuron % 4 == 0:
                for m, expert in ((model, 0), (model, 7), (other, None)):
                    xid = add_neuron(m, layer, neuron, expert)
                    rows[DESCRIPTIONS].append((f"{xid}_1_None", xid, 1, None, "not ours", None, "not ours", vec,
                                               {"score": 0.99}, None))
                    rows["exemplars"].append((f"{xid}_1_0", xid, 1, "not ours", 99.0, 0))
        if quirks:
            nid = neuron_id(model, layer, 1, None)
            rows[DESCRIPTIONS].append((f"{nid}_0_None", nid, 0, None, "polarity zero", None, None, vec, {}, None))
    copy_rows(conn, "language_models", ("id",), rows["language_models"])
    copy_rows(conn, "neurons", ("id", "model_id", "layer", "neuron", "expert"), rows["neurons"])
    copy_rows(conn, DESCRIPTIONS, ("id", "neuron_id", "polarity", "version", "description", "description_cleaned",
                                   "description_summary", "description_embedding", "description_metadata",
                                   "is_interesting"), rows[DESCRIPTIONS])
    copy_rows(conn, "quantiles", ("id", "neuron_id", "quantiles"), rows["quantiles"])
    copy_rows(conn, "exemplars", ("id", "neuron_id", "polarity", "text", "activation_value", "rank"), rows["exemplars"])
    return rows
