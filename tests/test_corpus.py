"""The corpus stage: real offline text, cut into exact windows, balanced, deterministic.

Only the tokenizer is loaded (no model), so this runs on a CPU in well under a minute
once the installed text has been scanned (about 10 s, once per session).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest

from engine.errors import MonitorError
from precompute.corpus import PROFILES, Corpus, build_corpus, corpus_hash

REQUIRED = ("prose", "plays", "bible", "dates", "changelogs", "decimals", "code", "chat")
# at least ~10% each for the sources of the headline experiment, and prose/plays/chat/code a bit larger
MIN_SHARE = {"bible": 0.10, "dates": 0.10, "changelogs": 0.10, "decimals": 0.10, "prose": 0.12, "plays": 0.12,
             "code": 0.12, "chat": 0.12}

# The tests' own patterns (deliberately not imported from precompute.sources).
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
MONTHS_SHORT = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
DATE = re.compile(
    rf"\b(19|20|1[6-8])\d\d-[01]\d-[0-3]\d\b|\b({MONTHS}|{MONTHS_SHORT})\.? \d{{1,2}}(st|nd|rd|th)?\b|\b\d{{1,2}}(st|nd|rd|th)? ({MONTHS}|{MONTHS_SHORT})\b"
)
BIBLE_REF = re.compile(r"\b((?:[123] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)?) (\d+):(\d+)\b")
VERSION = re.compile(r"\d+\.\d+(\.\d+)?")
DECIMAL = re.compile(r"\d+\.\d+")
NEW_TESTAMENT = {"Matthew", "Mark", "Luke", "John", "Acts", "Romans", "Galatians", "Ephesians", "Hebrews", "James", "Revelation"}


@pytest.fixture(scope="session")
def tokenizer():
    import engine.loader
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(engine.loader.ensure_embedded_model(progress=False)))


@pytest.fixture(scope="session")
def tiny(tokenizer):
    return build_corpus(tokenizer, "tiny", progress=False)


@pytest.fixture(scope="session")
def default_timed(tokenizer, tiny):
    # built after `tiny`, so the one-off scan of installed files is not in this time
    t0 = time.perf_counter()
    corpus = build_corpus(tokenizer, "default", progress=False)
    return corpus, time.perf_counter() - t0


@pytest.fixture(scope="session")
def default(default_timed):
    return default_timed[0]


def _of(corpus: Corpus, source: str) -> list[int]:
    return [i for i, s in enumerate(corpus.sources) if s == source]


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_every_sequence_has_exactly_seq_len_tokens(which, request, tokenizer):
    corpus = request.getfixturevalue(which)
    prof = PROFILES[which]
    assert corpus.token_ids.dtype == np.int32
    assert corpus.token_ids.shape == (prof.n_sequences, prof.seq_len)
    assert len(corpus.sources) == len(corpus.texts) == len(corpus.tokens) == prof.n_sequences
    assert all(len(t) == prof.seq_len for t in corpus.tokens)
    assert corpus.token_ids.min() >= 0 and corpus.token_ids.max() < len(tokenizer)
    for i in range(0, prof.n_sequences, 37):  # texts and token strings are decodings of the ids
        assert corpus.texts[i] == tokenizer.decode(corpus.token_ids[i].tolist())
        assert corpus.tokens[i] == [tokenizer.decode([t]) for t in corpus.token_ids[i].tolist()]


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_all_sources_present_with_their_shares(which, request):
    corpus = request.getfixturevalue(which)
    counts = Counter(corpus.sources)
    assert set(REQUIRED) <= set(counts), counts
    n = len(corpus)
    for name, share in MIN_SHARE.items():
        assert counts[name] / n >= share, (name, counts[name], n)
    assert min(counts[s] for s in ("prose", "plays", "code", "chat")) > max(counts[s] for s in ("bible", "dates", "changelogs", "decimals"))
    info = {d["name"]: d for d in corpus.source_info}
    assert {k: info[k]["n_sequences"] for k in info} == dict(counts)
    for d in corpus.source_info:
        assert d["licence"] and d["description"] and d["licences"]


def test_sources_are_interleaved_not_blocked(default):
    first = Counter(default.sources[:200])
    assert set(REQUIRED) <= set(first)


def test_bible_sequences_carry_references_from_across_the_bible(default):
    idx = _of(default, "bible")
    books = Counter()
    for i in idx:
        refs = BIBLE_REF.findall(default.texts[i])
        assert refs, default.texts[i]
        books.update(r[0] for r in refs)
    assert len(books) >= 30, books  # drawn across the whole book, not its first chapters
    assert NEW_TESTAMENT & set(books) and {"Genesis", "Exodus", "Isaiah", "Psalm", "Job"} | set(books)
    assert "Gen" not in books  # abbreviations are spelled out
    info = {d["name"]: d for d in default.source_info}["bible"]
    assert "Public domain (World English Bible)" in info["licence"]
    assert any("Yahweh" in default.texts[i] for i in idx)  # the WEB's rendering of the divine name


def test_plays_are_dialogue(default):
    idx = _of(default, "plays")
    speaker = re.compile(r"^[A-Z][A-Za-z .']+: \S", re.M)
    found = [len(speaker.findall(default.texts[i])) for i in idx]
    # "Name: words" speeches: more than one per window on average, and in most windows (a long speech can fill one)
    assert sum(found) >= len(idx) and np.mean([f > 0 for f in found]) >= 0.6
    assert not any("**" in default.texts[i] for i in idx)  # the Markdown is gone
    plays = {ref for ref in {d["name"]: d for d in default.source_info}["plays"]["licences"]}
    assert len(plays) >= 20, plays  # drawn across the plays


def test_dates_are_real_dates(default):
    idx = _of(default, "dates")
    missing = [default.texts[i] for i in idx if not DATE.search(default.texts[i])]
    assert not missing, missing[:3]
    # month-name dates ("September 8", "Mar 7, 2023"), not only ISO stamps
    named = sum(bool(re.search(rf"\b({MONTHS}|{MONTHS_SHORT})\.? \d", default.texts[i])) for i in idx)
    assert named >= 0.1 * len(idx)
    info = {d["name"]: d for d in default.source_info}["dates"]
    assert len({ref.split(":")[0] for ref in info["licences"]}) >= 10  # many packages, not one


def test_changelogs_have_version_numbers(default):
    idx = _of(default, "changelogs")
    assert all(VERSION.search(default.texts[i]) for i in idx)
    notes = sum(bool(re.search(r"\b(fix|add|remove|release|change|support|deprecat)", default.texts[i], re.I)) for i in idx)
    assert notes >= 0.3 * len(idx)  # release notes, not only version pins


def test_decimals_have_decimal_numbers_and_arithmetic(default):
    idx = _of(default, "decimals")
    assert all(DECIMAL.search(default.texts[i]) for i in idx)
    arithmetic = sum(bool(re.search(r"\d\s*[-+*/]\s*\d|->|>>> ", default.texts[i])) for i in idx)
    assert arithmetic >= 0.3 * len(idx)


def test_chat_sequences_use_the_chat_template(default, tokenizer):
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    idx = _of(default, "chat")
    for i in idx:
        assert "<|im_start|>" in default.texts[i]
        assert im_start in default.token_ids[i]  # the special token, not the string split into pieces
    roles = sum(("user\n" in default.texts[i]) or ("assistant\n" in default.texts[i]) for i in idx)
    assert roles >= 0.8 * len(idx)
    others = [i for i in range(len(default)) if default.sources[i] != "chat"]
    assert not np.isin(default.token_ids[others], [im_start]).any()


def test_code_is_python_and_prose_is_prose(default):
    code = [default.texts[i] for i in _of(default, "code")]
    # windows of source files also hit comments and constant tables, so not every one has a keyword
    assert sum(bool(re.search(r"\b(def|class|import|return|self|if|for|elif|else|None)\b", t)) for t in code) >= 0.6 * len(code)
    prose = [default.texts[i] for i in _of(default, "prose")]

    def share(texts, chars):
        return np.mean([sum(c in chars for c in t) / len(t) for t in texts])

    syntax = "()[]{}=:_#'\"."
    print(f"\nsyntax characters: code {share(code, syntax):.3f}, prose {share(prose, syntax):.3f}")
    assert share(code, syntax) > 1.4 * share(prose, syntax)
    assert np.mean([sum(c.isalpha() or c == " " for c in t) / len(t) for t in prose]) > 0.75


def test_same_arguments_give_the_same_corpus(tokenizer, tiny):
    again = build_corpus(tokenizer, "tiny", progress=False)
    assert again.corpus_hash == tiny.corpus_hash
    assert np.array_equal(again.token_ids, tiny.token_ids) and again.sources == tiny.sources
    other = build_corpus(tokenizer, "tiny", seed=1, progress=False)
    assert other.corpus_hash != tiny.corpus_hash


def test_hash_is_over_the_token_ids(tiny):
    assert corpus_hash(tiny.token_ids) == tiny.corpus_hash
    changed = tiny.token_ids.copy()
    changed[0, 0] += 1
    assert corpus_hash(changed) != tiny.corpus_hash


def test_seq_len_argument_overrides_the_profile(tokenizer):
    c = build_corpus(tokenizer, "tiny", seq_len=95, n_sequences=70, progress=False)
    assert c.token_ids.shape == (70, 95)
    assert set(c.sources) == set(REQUIRED)


def test_save_and_load_round_trip(tiny, tmp_path):
    path = tmp_path / "sub" / "corpus.parquet"
    tiny.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["corpus.parquet"]  # no temporary left behind
    back = Corpus.load(path)
    assert np.array_equal(back.token_ids, tiny.token_ids) and back.token_ids.dtype == np.int32
    assert back.sources == tiny.sources and back.texts == tiny.texts and back.tokens == tiny.tokens
    assert back.source_info == tiny.source_info and back.corpus_hash == tiny.corpus_hash


def test_load_rejects_missing_and_tampered_files(tiny, tmp_path):
    import pyarrow.parquet as pq

    with pytest.raises(MonitorError, match="No corpus"):
        Corpus.load(tmp_path / "nope.parquet")
    path = tmp_path / "c.parquet"
    tiny.save(path)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"monitor.corpus"])
    meta["corpus_hash"] = "0" * 64
    pq.write_table(table.replace_schema_metadata({"monitor.corpus": json.dumps(meta)}), path)
    with pytest.raises(MonitorError, match="corrupt"):
        Corpus.load(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(MonitorError, match="not a corpus"):
        Corpus.load(tmp_path / "junk.parquet")


# ---------------------------------------------------------------- user corpora
def _reference_paragraphs(n: int) -> list[str]:
    """Real paragraphs to write into user files (the stdlib's reference manual)."""
    from pydoc_data.topics import topics

    paras = [p.strip() for t in sorted(topics) for p in topics[t].split("\n\n") if len(p.strip()) > 200 and "\n " not in p]
    return paras[:n]


def test_user_txt_files_replace_the_default_sources(tokenizer, tmp_path):
    a, b = tmp_path / "alpha.txt", tmp_path / "beta.txt"
    paras = _reference_paragraphs(80)
    a.write_text("\n\n".join(paras[:40]))
    b.write_text("\n".join(p.replace("\n", " ") for p in paras[40:]))  # no blank lines: one document
    c = build_corpus(tokenizer, "tiny", seq_len=32, files=[a, str(b)], progress=False)
    assert set(c.sources) == {"alpha", "beta"}
    assert c.token_ids.shape[1] == 32 and 0 < len(c) <= 200
    texts = {"alpha": a.read_text(), "beta": b.read_text()}
    for text, src in zip(c.texts, c.sources):
        for line in text.split("\n")[1:-1]:  # whole lines of a window come from its own file
            if line.strip():
                assert line in texts[src]
    assert {d["name"]: d["licence"] for d in c.source_info}["alpha"].startswith("user-supplied")


def test_user_jsonl_with_text_and_messages(tokenizer, tmp_path):
    paras = _reference_paragraphs(30)
    path = tmp_path / "chats.jsonl"
    rows = [{"text": p} for p in paras[:15]]
    rows += [{"messages": [{"role": "user", "content": "Explain this."}, {"role": "assistant", "content": p}]} for p in paras[15:]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = build_corpus(tokenizer, "tiny", seq_len=48, files=[path], progress=False)
    assert set(c.sources) == {"chats"} and len(c) > 5
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (c.token_ids == im_start).any()  # messages rendered with the chat template
    assert any("Explain this." in t for t in c.texts)


def test_user_parquet_with_text_column(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = _reference_paragraphs(40)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": paras, "id": list(range(len(paras)))}), path)
    c = build_corpus(tokenizer, "tiny", seq_len=40, files=[path], progress=False)
    assert set(c.sources) == {"docs"} and len(c) > 10
    joined = "\n\n".join(paras)
    assert all(t.split("\n")[1] in joined for t in c.texts if t.count("\n") >= 2 and t.split("\n")[1].strip())


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("notes.csv", "a,b\n1,2\n", "unsupported extension"),
        ("empty.txt", "\n\n  \n", "no text"),
        ("rows.jsonl", '{"title": "no text field"}\n', "neither a `text`"),
        ("broken.jsonl", '{"text": "fine"}\n{not json\n', "not valid JSON"),
        ("short.txt", "Three words only.", "empty"),
    ],
)
def test_bad_user_files_raise_monitor_error(tokenizer, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MonitorError, match=match) as err:
        build_corpus(tokenizer, "tiny", files=[path], progress=False)
    assert "\n" not in str(err.value)


def test_other_bad_inputs_raise_monitor_error(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(MonitorError, match="does not exist"):
        build_corpus(tokenizer, "tiny", files=[tmp_path / "missing.txt"], progress=False)
    pq.write_table(pa.table({"body": ["x" * 500]}), tmp_path / "nocol.parquet")
    with pytest.raises(MonitorError, match="no `text` column"):
        build_corpus(tokenizer, "tiny", files=[tmp_path / "nocol.parquet"], progress=False)
    with pytest.raises(MonitorError, match="Unknown corpus profile"):
        build_corpus(tokenizer, "huge", progress=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "same.txt").write_text("x " * 500)
    (tmp_path / "same.txt").write_text("y " * 500)
    with pytest.raises(MonitorError, match="share the name"):
        build_corpus(tokenizer, "tiny", files=[tmp_path / "same.txt", tmp_path / "a" / "same.txt"], progress=False)


def test_hf_dataset_needs_monitor_online(tokenizer, monkeypatch):
    monkeypatch.delenv("MONITOR_ONLINE", raising=False)
    with pytest.raises(MonitorError, match="MONITOR_ONLINE=1"):
        build_corpus(tokenizer, "tiny", hf_dataset="HuggingFaceFW/fineweb", progress=False)


def test_hf_dataset_without_the_datasets_package(tokenizer, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed; this checks the message when it is not")
    monkeypatch.setenv("MONITOR_ONLINE", "1")
    with pytest.raises(MonitorError, match="pip install datasets"):
        build_corpus(tokenizer, "tiny", hf_dataset="HuggingFaceFW/fineweb", progress=False)


def test_default_profile_build_time(default_timed):
    corpus, seconds = default_timed
    print(f"\ndefault corpus: {corpus.token_ids.shape} built in {seconds:.1f}s (sources already scanned)")
    # the whole `build` has ~15 min on 2 cores and the forward pass needs ~3.5 of them
    assert seconds < 180
