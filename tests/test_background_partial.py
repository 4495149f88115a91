"""``make demo``'s quick partial database: built first, in the same background chain as the full one.

Real builds of the tiny random Llama (3 layers × 96 neurons): the launcher runs the partial build
then the full one in one process (one lock); the partial database's meta says it is partial; the
dashboard opens it while the full one is missing (with a banner) and switches to the full one when
it lands; a chain killed after the partial resumes straight to the full build.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from pathlib import Path

import pytest

from cache.build_status import is_locked, lock_path, log_path, read_status, record_path
from cache.paths import partial_path, resolve_db_path

from .test_background import _background, _wait_unlocked  # one launcher helper and one wait for both files

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
PARTIAL_N = 24  # the tiny full build has 48 sequences and 3 layers; the partial: 24 sequences, layer 0


def _args(model: Path, root: Path) -> list[str]:
    # no --quiet: the chain's log then says when it builds the partial database (asserted below)
    return ["--model", str(model), "--profile", "tiny", "--n-sequences", "48", "--batch-size", "8",
            "--work-dir", str(root / "build"), "--db", str(root / "neurons.duckdb"),
            "--partial-n-sequences", str(PARTIAL_N)]


def _meta(path: Path) -> dict:
    from cache.db import open_database

    with open_database(path) as db:
        return dict(db.meta)


def test_quick_config_is_the_full_build_smaller():
    """The quick build's settings: every fifth layer, QUICK_N_SEQUENCES sequences, its own files;
    every other setting is the full build's. None when it would be no smaller."""
    from precompute.pipeline import BuildConfig
    from precompute.quick import QUICK_N_SEQUENCES, quick_config

    full = BuildConfig(model="embedded", seed=3, batch_size=16, work_dir="/x/build/m", db="/x/m.duckdb")
    quick = quick_config(full, 30)
    assert quick.layers == "0,5,10,15,20,25" and quick.n_sequences == QUICK_N_SEQUENCES < 8192
    assert quick.db == "/x/m.partial.duckdb" and quick.work_dir == "/x/build/m-partial" and quick.partial
    same = {k: v for k, v in full.identity().items() if k not in ("n_sequences", "layers")}
    assert {k: v for k, v in quick.identity().items() if k not in ("n_sequences", "layers")} == same
    assert "partial" not in quick.identity()  # an existing build folder's config.json still matches
    assert quick_config(BuildConfig(layers="0,8,15,22,29"), 30).layers == "0"  # every fifth of the chosen ones
    assert quick_config(BuildConfig(n_sequences=100, layers="4"), 30) is None  # no smaller than the full build
    assert quick_config(BuildConfig(n_sequences=1000, layers="4"), 30).n_sequences == QUICK_N_SEQUENCES
    assert quick_config(BuildConfig(n_sequences=100), 30).n_sequences == 100  # fewer layers is still quicker


def test_partial_database_says_so_and_the_resolver_prefers_the_full_one(tiny_llama_dir, tiny_db, tmp_path, capsys,
                                                                       monkeypatch):
    from cache.__main__ import main as cache_main
    from cache.db import open_database
    from dashboard import resources
    from precompute.pipeline import Build, BuildConfig
    from precompute.quick import quick_config

    full_cfg = BuildConfig(model=str(tiny_llama_dir), profile="tiny", n_sequences=48, batch_size=8,
                           work_dir=str(tmp_path / "build"), db=str(tmp_path / "neurons.duckdb"))
    full = full_cfg.db_path
    quick = quick_config(full_cfg, 3, n_sequences=PARTIAL_N)
    assert quick.db_path == partial_path(full) == tmp_path / "neurons.partial.duckdb"
    monkeypatch.setenv("MONITOR_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("MONITOR_DB", str(full))

    # nothing built: the full path, whose absence the opener reports
    assert resolve_db_path(full) == full
    cfg = resources.get_config()
    assert cfg.db_path == full and not cfg.partial
    assert "No neuron database" in resources.get_db(cfg).error

    # the partial database alone: opened, and its meta says it is partial and what it covers
    Build(quick, progress=False).run()
    assert resolve_db_path(full) == quick.db_path
    cfg = resources.get_config()
    assert cfg.db_path == quick.db_path and cfg.target == full and cfg.partial
    r = resources.get_db(cfg)
    assert r.error is None and r.db.partial and r.db.path == quick.db_path
    meta = r.db.meta
    assert meta["partial"] == "true" and json.loads(meta["described_layers"]) == [0] and meta["n_sequences"] == "24"
    assert r.db.counts()["descriptions"] == 96 * 2  # one layer of 96 neurons, both polarities
    assert r.db.counts()["sequences"] == PARTIAL_N
    assert r.db.undescribed_note(0) is None
    note = r.db.undescribed_note(2)
    assert "Layer 2 is not in this partial database" in note and "layers 0" in note and "\n" not in note
    # the CLI by model name, its full database missing: the partial one, with a note
    monkeypatch.setenv("MONITOR_DATA_DIR", str(tmp_path / "data"))
    from cache.paths import db_path

    by_model = db_path(str(tiny_llama_dir))
    by_model.parent.mkdir()
    shutil.copy(quick.db_path, partial_path(by_model))
    capsys.readouterr()
    assert cache_main(["info", "--model", str(tiny_llama_dir), "--json"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["path"] == str(partial_path(by_model))
    assert got.err.startswith(f"note: {by_model.name} is not built yet; using the quick partial database")
    assert cache_main(["neuron", "2", "5", "--db", str(quick.db_path)]) == 0  # a layer it lacks: a note, no traceback
    out = capsys.readouterr().out
    assert "note: Layer 2 is not in this partial database" in out

    # the full database lands: it wins over the partial one
    shutil.copy(tiny_db, full)
    assert resolve_db_path(full) == full
    cfg = resources.get_config()
    assert cfg.db_path == full and not cfg.partial
    r = resources.get_db(cfg)
    assert r.db is not None and not r.db.partial and r.db.meta["partial"] == "false"
    assert r.db.undescribed_note(2) is None and r.db.counts()["sequences"] == 48
    with open_database(quick.db_path) as still:  # the partial file is untouched, just no longer opened
        assert still.partial


def test_launcher_builds_partial_then_full_once_and_resumes_after_a_kill(tiny_llama_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from dashboard import resources

    args = _args(tiny_llama_dir, tmp_path)
    db, work = tmp_path / "neurons.duckdb", tmp_path / "build"
    quick_db, quick_work = partial_path(db), tmp_path / "build-partial"
    monkeypatch.setenv("MONITOR_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("MONITOR_DB", str(db))

    # 1. the chain, killed in the full build's descriptions stage (after its layer 1: the partial
    #    build describes layer 0 only, so it never reaches that kill point)
    monkeypatch.setenv("PRECOMPUTE_KILL_AT", "descriptions:2")
    out = _background(args, capsys)
    assert "Started the database build in the background" in out
    assert f"first a quick partial database (layers 0; {PARTIAL_N} sequences) → {quick_db}" in out
    record = json.loads(record_path(db).read_text())
    first_pid = record["pid"]
    assert [p["build"] for p in record["phases"]] == ["partial", "full"]
    assert "--partial-first" in record["argv"]
    out = _background(args, capsys)  # a second `make demo` while it runs starts nothing
    assert "already running" in out and f"pid {first_pid}" in out
    assert json.loads(record_path(db).read_text())["pid"] == first_pid
    _wait_unlocked(db)

    # the partial database was written, then the full build started and was killed
    assert quick_db.exists() and not db.exists()
    assert (work / "corpus.done").exists() and (work / "descriptions" / "layer-001.parquet").exists()
    assert not (work / "descriptions" / "layer-002.parquet").exists()
    assert quick_db.stat().st_mtime_ns <= (work / "corpus.done").stat().st_mtime_ns  # partial first, then full
    meta = _meta(quick_db)
    assert meta["partial"] == "true" and json.loads(meta["described_layers"]) == [0]
    assert meta["n_sequences"] == str(PARTIAL_N)
    assert (quick_work / "write.done").exists()
    status = read_status(db)
    assert not status.running and status.build == "full" and status.stage == "descriptions"
    assert "It stopped at stage 'descriptions' of the full build" in status.sentence()
    log = log_path(db).read_text()
    assert log.count("quick partial database first") == 1 and log.count("partial database written") == 1

    # meanwhile the dashboard opens the partial database
    cfg = resources.get_config()
    assert cfg.partial and cfg.db_path == quick_db
    r = resources.get_db(cfg)
    assert r.db is not None and r.db.partial
    from cache.build_status import partial_banner

    banner = partial_banner(r.db.meta, status)
    assert banner.startswith(f"Partial database: layers 0; {PARTIAL_N} sequences.")
    assert "The full build is not running (it stopped at stage 'descriptions')" in banner

    # 2. the next `make demo` resumes the chain: the partial part is skipped, the full build resumes
    monkeypatch.delenv("PRECOMPUTE_KILL_AT")
    quick_mtime = quick_db.stat().st_mtime_ns
    layer0_mtime = (work / "descriptions" / "layer-000.parquet").stat().st_mtime_ns
    out = _background(args, capsys)
    assert "Started" in out and "the quick partial database is present, so the full one" in out
    assert json.loads(record_path(db).read_text())["pid"] != first_pid
    seen = set()
    while is_locked(db):
        s = read_status(db)
        if s is not None and s.running:
            seen.add(s.build)
            assert s.sentence().startswith("The full database (build 2 of 2) is being built in the background")
        try:
            assert quick_db.stat().st_mtime_ns == quick_mtime, "the resumed chain rebuilt the partial database"
        except FileNotFoundError:  # the full database landed and the chain deleted the partial one
            pass
        time.sleep(0.1)
    assert seen == {"full"}
    log = log_path(db).read_text()
    assert log.count("quick partial database first") == 1, "the resumed chain built the partial database again"
    assert (work / "descriptions" / "layer-000.parquet").stat().st_mtime_ns == layer0_mtime

    # 3. the full database landed: it supersedes (and replaces) the partial one
    assert db.exists() and not quick_db.exists() and not quick_work.exists()
    meta = _meta(db)
    assert meta["partial"] == "false" and json.loads(meta["described_layers"]) == [0, 1, 2]
    assert meta["n_sequences"] == "48"
    cfg = resources.get_config()
    assert cfg.db_path == db and not cfg.partial
    assert resources.get_db(cfg).db.counts()["descriptions"] == 3 * 96 * 2
    assert read_status(db).sentence() == f"The neuron database {db.name} is ready."
    assert "present; no build needed" in _background(args, capsys)


def test_no_partial_launches_the_full_build_alone(tiny_llama_dir, tmp_path, capsys):
    args = _args(tiny_llama_dir, tmp_path) + ["--no-partial"]
    db = tmp_path / "neurons.duckdb"
    out = _background(args, capsys)
    assert "Started" in out and "quick partial" not in out
    record = json.loads(record_path(db).read_text())
    assert "phases" not in record and "--partial-first" not in record["argv"] and "--no-partial" not in record["argv"]
    _wait_unlocked(db)
    assert db.exists() and not partial_path(db).exists() and not (tmp_path / "build-partial").exists()


def test_pages_show_the_partial_banner_and_switch_to_the_full_database(tiny_llama_dir, tiny_db, tmp_path,
                                                                      monkeypatch):
    """A running chain (this test holds its lock) in its full build, the partial database present:
    every page opens the partial one under a banner; when the full one lands the same session reruns
    onto it, without a restart."""
    from streamlit.testing.v1 import AppTest

    from cache.build_status import ProgressFile
    from precompute.pipeline import Build, BuildConfig
    from precompute.quick import quick_config

    full_cfg = BuildConfig(model=str(tiny_llama_dir), profile="tiny", n_sequences=48, batch_size=8,
                           work_dir=str(tmp_path / "build"), db=str(tmp_path / "neurons.duckdb"))
    quick = quick_config(full_cfg, 3, n_sequences=PARTIAL_N)
    Build(quick, progress=False).run()
    db = full_cfg.db_path
    record_path(db).write_text(json.dumps({
        "pid": 1, "work_dir": str(full_cfg.root),
        "phases": [{"build": "partial", "db": str(quick.db_path), "work_dir": str(quick.root), "layers": [0],
                    "n_sequences": PARTIAL_N},
                   {"build": "full", "db": str(db), "work_dir": str(full_cfg.root)}]}))
    pf = ProgressFile(full_cfg.root)
    pf.stage("activations", 2, 7)
    bar = pf.bar(_NullBar(), 6, "activations (shard 0/1)")
    bar.update(3)
    bar.close()  # flushes the count to progress.json
    monkeypatch.setenv("MONITOR_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("MONITOR_DB", str(db))
    with open(lock_path(db), "w") as fh:  # this test process plays the running chain
        fcntl.flock(fh, fcntl.LOCK_EX)
        chat = AppTest.from_file(str(APP), default_timeout=300)  # the chat page (app.py runs around it)
        chat.run()
        assert not chat.exception, [e.value for e in chat.exception]
        banners = [w.value for w in chat.warning if w.value.startswith("Partial database")]
        assert len(banners) == 1, banners
        assert banners[0].startswith(f"Partial database: layers 0; {PARTIAL_N} sequences. The full build is running: "
                                     "stage 2 of 7, activations (activations (shard 0/1): 3/6, 50%, about ")
        assert banners[0].endswith("left in this stage). Pages switch to the full database when it lands, "
                                   "without a restart.")
        side = " ".join(c.value for c in chat.caption)
        assert "neurons.partial.duckdb` (partial)" in side
        assert "the full database (build 2 of 2) is being built in the background: stage 2 of 7" in side.lower()

        # a layer the partial database does not describe: one line on the neuron page, no traceback
        # (AppTest runs a switched-to page without app.py, so the banner is checked on the chat page)
        page = AppTest.from_file(str(APP), default_timeout=300)
        page.switch_page("pages/neuron.py")
        page.query_params = {"layer": "2", "neuron": "5"}
        page.run()
        assert not page.exception, [e.value for e in page.exception]
        assert any(i.value.startswith("Layer 2 is not in this partial database (it describes layers 0, from 24 "
                                      "sequences)") for i in page.info)

        # the full database lands: the same session's next run opens it, without a restart (the
        # neuron page describes layer 2 now), and app.py shows no banner (a new AppTest: on a rerun
        # AppTest runs the page alone)
        shutil.copy(tiny_db, db)
        page.run()
        assert not page.exception, [e.value for e in page.exception]
        assert not any("not in this partial database" in i.value for i in page.info)
        assert any(m.value == "**Positive polarity (fires high)**" for m in page.markdown)
        assert "not described" not in [c.value for c in page.caption]
        chat = AppTest.from_file(str(APP), default_timeout=300)
        chat.run()
        assert not chat.exception, [e.value for e in chat.exception]
        assert not any(w.value.startswith("Partial database") for w in chat.warning)
        assert "database `neurons.duckdb`" in " ".join(c.value for c in chat.caption)


class _NullBar:
    def update(self, k=1):
        pass

    def close(self):
        pass
