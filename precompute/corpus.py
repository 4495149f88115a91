"""The corpus stage: fixed-length token sequences of real text, balanced across sources.

:func:`build_corpus` draws documents from each source (see :mod:`precompute.sources`),
tokenises them and cuts exact ``seq_len``-token windows. The result, a :class:`Corpus`,
is what the activation stage runs the model over to find each neuron's top exemplars.

How a source becomes windows (the choices and why):

* **Shares.** Each source gets ``n_sequences * weight / sum(weights)`` windows,
  rounded by largest remainder so the total is exact. A source that runs out of text
  hands its shortfall to the others in proportion to their weights (this happens for
  dates and changelogs in the ``full`` profile; ``source_info`` records the real counts).
* **Sampling across the whole source.** Docs are short passages (a chapter run, a code
  chunk, a changelog section). They are shuffled with a seeded RNG and taken
  round-robin across their origins (Bible books, packages, doc kinds), in batches just
  big enough for the windows still needed. Within a batch, docs are put back in their
  natural order (so neighbouring passages stay contiguous), tokenised one by one,
  joined with the source's separator and cut into consecutive windows after a random
  offset. A window never mixes sources and is never padded.
* **Defining features.** A source may require a pattern in every window (a
  chapter:verse reference, a date, a version, a decimal, the chat marker); windows
  without it are dropped. This keeps e.g. every "dates" exemplar dated.
* **Determinism.** File lists are sorted and every random choice comes from
  ``numpy.random.default_rng`` seeded by (seed, source name), so the same installed
  files and arguments give a byte-identical corpus and the same :attr:`Corpus.corpus_hash`.
* No BOS token is added: the model's massive first-token activations belong to the
  activation stage to handle, and a corpus of raw text windows keeps that choice open.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import MonitorError
from precompute import sources as sources_mod
from precompute.sources import Doc, SourceSpec, default_sources, file_source, hf_source

FORMAT_VERSION = 1
MAX_LICENCE_REFS = 5000  # per source; the 524k-token default draws dates from ~900 files


@dataclass(frozen=True)
class Profile:
    """A corpus size: how many sequences, and their default length in tokens."""

    n_sequences: int
    seq_len: int
    note: str


PROFILES: dict[str, Profile] = {
    "tiny": Profile(200, 64, "tests: a few seconds once the sources are loaded"),
    "default": Profile(8_192, 64, "the embedded model on 2 CPU cores: 524k tokens, ~6 min of bf16 forward at ~1,400 tokens/s"),
    "full": Profile(50_000, 95, "bigger machines; 95 tokens is the reference's sequence length"),
}


@dataclass
class Corpus:
    """Fixed-length token sequences and where each came from.

    ``token_ids`` is ``int32 [n_sequences, seq_len]``; ``sources``, ``texts`` and
    ``tokens`` have one entry per sequence (``tokens[i]`` has one decoded string per
    token, so ``"".join(tokens[i])`` is ``texts[i]`` up to byte-level merges).
    ``source_info`` has one dict per source: name, licence, n_sequences, description,
    plus ``licences`` ({ref: licence} of the docs it drew from) and ``origins``.
    """

    token_ids: np.ndarray  # int32 [n_sequences, seq_len]
    sources: list[str]
    texts: list[str]
    tokens: list[list[str]]
    source_info: list[dict]
    corpus_hash: str

    @property
    def seq_len(self) -> int:
        return int(self.token_ids.shape[1])

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def save(self, path: Path) -> None:
        """Write Parquet atomically: a temporary file in the same folder, then a rename.

        Columns: seq, source, token_ids (list<int32>), text, tokens (list<string>).
        The schema metadata key ``monitor.corpus`` holds the hash, seq_len and source_info.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n, seq_len = self.token_ids.shape
        ids = np.ascontiguousarray(self.token_ids, dtype=np.int32)
        offsets = np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32)
        token_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1), type=pa.int32()))
        table = pa.table(
            {
                "seq": pa.array(np.arange(n, dtype=np.int32)),
                "source": pa.array(self.sources, type=pa.string()).dictionary_encode(),
                "token_ids": token_col,
                "text": pa.array(self.texts, type=pa.string()),
                "tokens": pa.array(self.tokens, type=pa.list_(pa.string())),
            }
        )
        meta = {"format_version": FORMAT_VERSION, "corpus_hash": self.corpus_hash, "seq_len": seq_len, "source_info": self.source_info}
        table = table.replace_schema_metadata({"monitor.corpus": json.dumps(meta)})
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: Path) -> "Corpus":
        """Read a corpus written by :meth:`save`; the hash is recomputed and must match."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise MonitorError(f"No corpus at {path}; build one with `python -m precompute build`.")
        try:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {})[b"monitor.corpus"])
        except Exception as err:  # noqa: BLE001 - pyarrow/json raise many types
            raise MonitorError(f"{path} is not a corpus file ({type(err).__name__}); rebuild it.") from None
        seq_len = int(meta["seq_len"])
        flat = table.column("token_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        ids = np.asarray(flat, dtype=np.int32).reshape(-1, seq_len)
        corpus = cls(
            token_ids=ids,
            sources=[str(s) for s in table.column("source").to_pylist()],
            texts=table.column("text").to_pylist(),
            tokens=table.column("tokens").to_pylist(),
            source_info=meta["source_info"],
            corpus_hash=meta["corpus_hash"],
        )
        if corpus_hash(ids) != corpus.corpus_hash:
            raise MonitorError(f"{path} is corrupt (its token ids do not match its hash); rebuild it.")
        return corpus


def corpus_hash(token_ids: np.ndarray) -> str:
    """sha256 over the shape and the little-endian int32 token ids, row-major."""
    ids = np.ascontiguousarray(token_ids, dtype="<i4")
    h = hashlib.sha256(f"int32:{ids.shape[0]}x{ids.shape[1]}:".encode())
    h.update(ids.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- sampling
def _source_rng(seed: int, name: str) -> np.random.Generator:
    """One RNG per source, so adding or dropping a source leaves the others' draws unchanged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def stratified_order(docs: list[Doc], rng: np.random.Generator) -> list[int]:
    """Doc indices, shuffled within each origin, then taken round-robin across origins in a shuffled order."""
    by_origin: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_origin.setdefault(d.origin, []).append(i)
    origins = sorted(by_origin)
    origins = [origins[j] for j in rng.permutation(len(origins))]
    queues = [[by_origin[o][j] for j in rng.permutation(len(by_origin[o]))] for o in origins]
    order: list[int] = []
    depth = 0
    while len(order) < len(docs):
        for q in queues:
            if depth < len(q):
                order.append(q[depth])
        depth += 1
    return order


class _WindowStream:
    """Cuts windows from one source, batch by batch, until asked for no more or out of docs."""

    def __init__(self, spec: SourceSpec, tokenizer, seq_len: int, seed: int, progress: bool):
        self.spec, self.tok, self.seq_len, self.progress = spec, tokenizer, seq_len, progress
        self.rng = _source_rng(seed, spec.name)
        self.order: list[int] | None = None
        self.pos = 0
        self.buffer: list[int] = []
        self.ready: list[np.ndarray] = []
        self.chars_per_token = 3.5  # a first guess; measured after each batch
        self.accept = 1.0  # fraction of windows kept by must_match; measured
        self.sep_ids = tokenizer(spec.separator, add_special_tokens=False)["input_ids"] if spec.separator else []
        self.refs: dict[str, str] = {}
        self.origins: dict[str, int] = {}
        self.n_tokens_read = 0

    @property
    def exhausted(self) -> bool:
        return self.order is not None and self.pos >= len(self.order) and not self.ready

    def take(self, k: int) -> list[np.ndarray]:
        docs = self.spec.docs()
        if self.order is None:
            self.order = stratified_order(docs, self.rng)
        while len(self.ready) < k and self.pos < len(self.order):
            need = (k - len(self.ready)) * self.seq_len / max(self.accept, 0.05)
            budget = need * self.chars_per_token * 1.15 + 2 * self.seq_len * self.chars_per_token
            picked, size = [], 0
            while self.pos < len(self.order) and size < budget:
                i = self.order[self.pos]
                picked.append(i)
                size += len(docs[i].text)
                self.pos += 1
            self._cut(sorted(picked), docs)
        out, self.ready = self.ready[:k], self.ready[k:]
        return out

    def _cut(self, picked: list[int], docs: list[Doc]) -> None:
        from tqdm.auto import tqdm

        texts = [docs[i].text for i in picked]
        ids: list[list[int]] = []
        step = 256
        bar = tqdm(total=len(texts), desc=f"tokenising {self.spec.name}", unit="doc", delay=1.5, disable=not self.progress, leave=False)
        for a in range(0, len(texts), step):
            enc = self.tok(texts[a : a + step], add_special_tokens=False, split_special_tokens=not self.spec.special_tokens)
            ids += enc["input_ids"]
            bar.update(len(texts[a : a + step]))
        bar.close()
        n_chars = sum(map(len, texts))
        n_tok = sum(map(len, ids))
        if n_tok:
            self.chars_per_token = max(1.0, n_chars / n_tok)
        self.n_tokens_read += n_tok
        for i in picked:
            d = docs[i]
            self.refs.setdefault(d.ref, d.licence)
        stream = list(self.buffer)
        for seq in ids:
            if stream and self.sep_ids:
                stream += self.sep_ids
            stream += seq
        skip = int(self.rng.integers(0, self.seq_len)) if len(stream) > 2 * self.seq_len else 0
        n_win = (len(stream) - skip) // self.seq_len
        arr = np.asarray(stream[skip : skip + n_win * self.seq_len], dtype=np.int32).reshape(n_win, self.seq_len)
        self.buffer = stream[skip + n_win * self.seq_len :]
        if not n_win:
            return
        kept = 0
        if self.spec.must_match is not None:
            decoded = self.tok.batch_decode(arr.tolist())
            for row, text in zip(arr, decoded):
                if self.spec.must_match.search(text):
                    self.ready.append(row)
                    kept += 1
        else:
            self.ready += list(arr)
            kept = n_win
        self.accept = max(0.05, 0.5 * self.accept + 0.5 * kept / n_win)


def _shares(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` by ``weights`` with largest-remainder rounding (ties to the earlier source)."""
    if not weights:
        return []
    w = np.asarray(weights, dtype=float)
    raw = n * w / w.sum()
    base = np.floor(raw).astype(int)
    rest = n - int(base.sum())
    order = sorted(range(len(w)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base.tolist()


def build_corpus(
    tokenizer,
    profile: str = "default",
    seq_len: int | None = None,
    files: list | None = None,
    hf_dataset: str | None = None,
    seed: int = 0,
    progress: bool = True,
    n_sequences: int | None = None,
) -> Corpus:
    """Build a corpus of ``n_sequences`` windows of exactly ``seq_len`` tokens.

    ``profile`` ("tiny", "default", "full") sets both numbers unless ``seq_len`` or
    ``n_sequences`` is given. ``files`` (.txt/.jsonl/.parquet paths) and/or
    ``hf_dataset`` ("owner/name", needs MONITOR_ONLINE=1) replace the built-in sources,
    one source per file (named by its stem) or dataset, in equal shares.
    """
    if profile not in PROFILES:
        raise MonitorError(f"Unknown corpus profile {profile!r}; use one of: {', '.join(PROFILES)}.")
    prof = PROFILES[profile]
    seq_len = prof.seq_len if seq_len is None else int(seq_len)
    n_total = prof.n_sequences if n_sequences is None else int(n_sequences)
    if seq_len < 2:
        raise MonitorError(f"seq_len must be at least 2 tokens (got {seq_len}).")
    if n_total < 1:
        raise MonitorError(f"n_sequences must be at least 1 (got {n_total}).")

    sources_mod.SHOW_PROGRESS = progress
    if files or hf_dataset:
        specs = [file_source(f, tokenizer) for f in (files or [])]
        if hf_dataset:
            specs.append(hf_source(hf_dataset, tokenizer, max_chars=n_total * seq_len * 8, seed=seed))
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise MonitorError(f"Two corpus files share the name {dupes[0]!r}; rename one (a source is named by its file stem).")
    else:
        specs = default_sources(tokenizer, seed=seed)

    t0 = time.perf_counter()
    streams = [_WindowStream(s, tokenizer, seq_len, seed, progress) for s in specs]
    targets = _shares(n_total, [s.weight for s in specs])
    got: list[list[np.ndarray]] = [st.take(k) for st, k in zip(streams, targets)]
    # hand any shortfall to the sources that still have text, by weight
    while True:
        short = n_total - sum(map(len, got))
        open_ = [i for i, st in enumerate(streams) if not st.exhausted]
        if short <= 0 or not open_:
            break
        extra = _shares(short, [specs[i].weight for i in open_])
        added = 0
        for i, k in zip(open_, extra):
            more = streams[i].take(k) if k else []
            got[i] += more
            added += len(more)
        if added == 0:
            break
    total = sum(map(len, got))
    if total == 0:
        raise MonitorError(
            f"The corpus is empty: its sources hold fewer than seq_len={seq_len} tokens; add text or lower --seq-len."
        )

    rows = np.stack([w for ws in got for w in ws]).astype(np.int32)
    names = [s.name for s, ws in zip(specs, got) for _ in ws]
    perm = np.random.default_rng([seed, 1]).permutation(len(rows))  # interleave sources: a partial run sees all
    rows = rows[perm]
    names = [names[i] for i in perm]

    texts = tokenizer.batch_decode(rows.tolist())
    vocab = _token_strings(tokenizer, rows)
    tokens = [[vocab[int(t)] for t in row] for row in rows]
    info = [
        {
            "name": s.name,
            "licence": s.licence,
            "n_sequences": len(ws),
            "description": s.description,
            "target": k,
            "licences": dict(sorted(st.refs.items())) if len(st.refs) <= MAX_LICENCE_REFS else {"(many)": s.licence},
            "tokens_read": st.n_tokens_read,
        }
        for s, st, ws, k in zip(specs, streams, got, targets)
    ]
    corpus = Corpus(rows, names, texts, tokens, info, corpus_hash(rows))
    if progress:
        counts = ", ".join(f"{d['name']} {d['n_sequences']}" for d in info)
        print(f"corpus: {len(rows)} × {seq_len} tokens in {time.perf_counter() - t0:.1f}s ({counts})", file=sys.stderr)
    return corpus


def _token_strings(tokenizer, rows: np.ndarray) -> dict[int, str]:
    """Each token id that occurs, decoded on its own (a byte-level piece of a character shows as '�')."""
    uniq = np.unique(rows).tolist()
    return dict(zip(uniq, tokenizer.batch_decode([[i] for i in uniq])))


def main(argv: list[str] | None = None) -> int:
    """`python -m precompute.corpus --profile tiny --out corpus.parquet`: build, save, show examples."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--profile", default="default", choices=list(PROFILES))
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--files", nargs="*", default=None)
    ap.add_argument("--hf-dataset", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--show", type=int, default=0, help="print this many random examples per source")
    args = ap.parse_args(argv)
    try:
        from transformers import AutoTokenizer

        from engine.loader import ensure_embedded_model

        tok = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))
        corpus = build_corpus(tok, args.profile, args.seq_len, args.files, args.hf_dataset, args.seed)
        if args.out:
            corpus.save(args.out)
    except MonitorError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps({"hash": corpus.corpus_hash, "shape": list(corpus.token_ids.shape),
                      "sources": {d["name"]: d["n_sequences"] for d in corpus.source_info}}))  # fmt: skip
    rng = np.random.default_rng(args.seed)
    for d in corpus.source_info:
        idx = [i for i, s in enumerate(corpus.sources) if s == d["name"]]
        for i in rng.choice(idx, size=min(args.show, len(idx)), replace=False) if idx else []:
            print(f"--- {d['name']} #{i}\n{corpus.texts[i]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
