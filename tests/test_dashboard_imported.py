"""The dashboard on imported databases (AppTest): a Transluce import of the tiny Llama, whose
exemplars are text only, and OpenAI's GPT-2 XL records, which the engine cannot run.

Checks that the pages say plainly what an import lacks (no per-token highlighting, no output
tokens), that browsing and search work, and that a browse-only database turns live features
off with the reason instead of trying to load a model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.publisher_exports import openai_dataset  # noqa: E402
from tests.test_dashboard import new_app, ok, table, texts  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def openai_db(tmp_path_factory) -> Path:
    from cache.__main__ import main

    root = tmp_path_factory.mktemp("openai")
    folder, _ = openai_dataset(root)
    out = root / "gpt2-xl.duckdb"
    assert main(["import", "openai", str(folder), "--out", str(out)]) == 0
    return out


def test_transluce_import_neuron_page_and_search(monkeypatch, tiny_transluce):
    path, rows, model = tiny_transluce
    monkeypatch.setenv("MONITOR_MODEL", model)
    monkeypatch.setenv("MONITOR_DB", str(path))
    at = new_app()
    at.switch_page("pages/neuron.py")
    at.query_params = {"layer": "1", "neuron": "5"}
    ok(at.run())
    shown = texts(at)
    assert any(i.value.startswith("Imported from Transluce NeuronDB") and "highlighted" in i.value for i in at.info)
    assert "No per-token activations in this database" in shown
    assert "The source did not publish output tokens for this neuron." in shown
    expected = [r[3] for r in rows["exemplars"] if r[1] == f"{model}_1_5_None"]
    plain = [h.value for h in at.html if "mon-plain" in h.value]
    assert len(plain) == len(expected) and all(t.split("\n")[0].replace("'", "&#x27;") in "".join(plain)
                                               for t in expected)
    assert any("Every score" in e.label for e in at.expander)
    assert not [e for e in at.error]
    at.switch_page("pages/browse.py")
    at.query_params = {"q": "Bible verses"}
    ok(at.run())
    found = table(at, "browse_results")
    assert len(found) == 50 and found["summary"].str.contains("Bible verses").head(5).all()
    at.switch_page("pages/about.py")
    ok(at.run())
    facts = dict(table(at, "meta_table").values.tolist())
    assert facts["imported from"] == "Transluce NeuronDB" and "sysadmin" not in facts["source location"]
    assert "no per-token activations" in facts["lacks"].lower() or "highlighted" in facts["lacks"]
    assert facts["re-import with"].startswith("python -m cache import transluce")


def test_browse_only_database_turns_live_features_off(monkeypatch, openai_db):
    monkeypatch.setenv("MONITOR_MODEL", "embedded")
    monkeypatch.setenv("MONITOR_DB", str(openai_db))
    at = ok(new_app().run())
    assert any("browsing only" in i.value and "GPT-2 XL is not a Llama" in i.value for i in at.info)
    assert at.chat_input[0].disabled and not at.error
    at.switch_page("pages/neuron.py")
    at.query_params = {"layer": "0", "neuron": "1"}
    ok(at.run())
    assert any("GPT-2 XL is not a Llama" in i.value for i in at.info)
    assert len([h for h in at.html if 'class="mon-toks">' in h.value]) == 5  # 3 top + 2 random, highlighted
    assert "a better one 0" in texts(at)
    for page in ("pages/steering.py", "pages/experiments.py"):
        at.switch_page(page)
        ok(at.run())
        assert any("browsing only" in i.value for i in at.info), page
    at.switch_page("pages/browse.py")
    at.query_params = {"q": "topic", "mode": "keyword"}
    ok(at.run())
    assert len(table(at, "browse_results")) == 3  # 0/0, 0/2, 1/2 (0/1 and 1/1 kept "a better one")
