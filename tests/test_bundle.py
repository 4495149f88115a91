"""The hosting bundle (``python -m cache bundle``): smaller, read-only, and searching like its source.

Checked against the source database itself: every int8 embedding row against its float row
(cosine), the kept exemplars row for row, the top-20 search overlap on the fixed queries, and
the CLI's one-line errors for a corrupt bundle and for a bundle that fails the overlap check.
"""

from __future__ import annotations

import json
import os
import stat

import duckdb
import numpy as np
import pytest

from cache.__main__ import main as cache_main
from cache.bundle import CHECK_QUERIES, search_overlap, write_bundle
from cache.db import open_database

pytestmark = pytest.mark.slow


def _float_rows(path) -> np.ndarray:
    with duckdb.connect(str(path), read_only=True) as c:
        t = c.sql("SELECT vec FROM embeddings ORDER BY layer, neuron, polarity").to_arrow_table()
    col = t.column("vec").combine_chunks()
    return col.flatten().to_numpy().astype(np.float32).reshape(len(col), -1)


def test_bundle_of_the_test_database(embedded_db, tmp_path, capsys):
    out = tmp_path / "demo.duckdb"
    assert cache_main(["bundle", "--db", str(embedded_db), "--out", str(out), "--json"]) == 0
    assert '"overlap_min"' in capsys.readouterr().out
    # smaller than the source, and left read-only
    assert out.stat().st_size < embedded_db.stat().st_size
    assert not out.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # every embedding keeps its direction: cosine with the source's float row, computed here from raw SQL
    src_vecs, codes = _float_rows(embedded_db), _float_rows(out)
    assert src_vecs.shape == codes.shape
    cos = (src_vecs * codes).sum(1) / np.linalg.norm(src_vecs, axis=1) / np.linalg.norm(codes, axis=1)
    assert cos.min() > 0.999, cos.min()
    with open_database(embedded_db) as src, open_database(out) as small:
        assert small.meta["bundle"] and small.counts()["descriptions"] == src.counts()["descriptions"]
        # search quality on the fixed queries (the bundle was only written because this held; check it again)
        overlap = search_overlap(src, small)
        assert len(overlap) == len(CHECK_QUERIES) and min(overlap) >= 0.9, overlap
        # the kept exemplars are the source's five most extreme per side, unchanged; no random ones
        layer = json.loads(src.meta["described_layers"])[0]
        a, b = src.neuron(layer, 7), small.neuron(layer, 7)
        want = [e for e in a["exemplars"] if e["polarity"] != 0 and e["rank"] < 5]
        assert b["exemplars"] == want and len(want) == 10
        assert b["descriptions"] == a["descriptions"] and b["quantiles"] == a["quantiles"]


def test_bundle_errors_are_one_line(tiny_db, tmp_path, capsys):
    # a bundle that cannot meet an impossible overlap is not written
    out = tmp_path / "never.duckdb"
    assert cache_main(["bundle", "--db", str(tiny_db), "--out", str(out), "--min-overlap", "1.01"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # the progress bar, then one line
    assert "nothing written" in err[-1] and not any("Traceback" in line for line in err)
    assert not out.exists() and not (tmp_path / "never.duckdb.tmp").exists()
    # a corrupt bundle: one clear line, exit 2
    good = tmp_path / "good.duckdb"
    report = write_bundle(tiny_db, good, progress=False)
    assert report["overlap_min"] >= 0.9
    bad = tmp_path / "corrupt.duckdb"
    data = bytearray(good.read_bytes())
    data[: 1 << 14] = os.urandom(1 << 14)
    bad.write_bytes(bytes(data))
    assert cache_main(["info", "--db", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err, err
