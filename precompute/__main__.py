"""``python -m precompute``: build, inspect and shard the neuron database.

    python -m precompute build --model embedded            # every stage, resumable
    python -m precompute status --model embedded           # what is built, what is missing
    python -m precompute background --model embedded       # start or resume the build in the background:
                                                           # a quick partial database first, then the full one
    accelerate launch -m precompute activations --model M  # one shard per process
    python -m precompute activations --shard 1 --num-shards 4
    python -m precompute merge --model M                   # merge shards, finish the database
    python -m precompute build --explainer llm --llm-base-url http://localhost:8000/v1 --llm-model M
                                                           # descriptions and scores by an LLM (precompute/llm.py)

A :class:`~engine.errors.MonitorError` prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.errors import MonitorError, at_least, run_command  # noqa: E402

from .pipeline import STAGES, Build, BuildConfig, parse_layers  # noqa: E402


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id")
    p.add_argument("--profile", default="default", choices=["tiny", "default", "full"], help="corpus size")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (profile default)")
    p.add_argument("--n-sequences", type=int, default=None, help="number of sequences (profile default)")
    p.add_argument("--files", nargs="*", default=[], help="your own corpus: .txt, .jsonl or .parquet files")
    p.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset id (needs MONITOR_ONLINE=1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=20, help="top exemplars kept per neuron and polarity (≥ 20)")
    p.add_argument("--n-random", type=int, default=40,
                   help="random sequences kept for every neuron (half the explainer's background, half held out)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="activation pass arithmetic: auto = bf16 autocast on a CPU with bf16 instructions, else fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding-model", default=None, help="a local sentence-transformers folder")
    p.add_argument("--checkpoint-every", type=int, default=64, help="batches between activation checkpoints")
    p.add_argument("--embed-chunk", type=int, default=4096, help="descriptions per embedding checkpoint")
    p.add_argument("--layers", default=None, help="describe only these layers, e.g. 0,5,10-12 (default: all)")
    p.add_argument("--work-dir", default=None, help="build folder (default data/build/<model>)")
    p.add_argument("--db", default=None, help="database path (default data/<model>.duckdb)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("LLM explainer (optional; see precompute/llm.py)")
    g.add_argument("--explainer", choices=["offline", "llm"], default=None,
                   help="offline (no API), or llm: an OpenAI-compatible endpoint. Default: llm when "
                        "MONITOR_LLM_BASE_URL (or --llm-base-url) is set, else offline")
    g.add_argument("--llm-base-url", default=None, help="e.g. http://localhost:8000/v1 (default $MONITOR_LLM_BASE_URL); "
                   "the key is read from $MONITOR_LLM_API_KEY")
    g.add_argument("--llm-model", default=None, help="model name (default $MONITOR_LLM_MODEL)")
    g.add_argument("--llm-n", type=int, default=None, help="candidate descriptions per neuron and polarity (default 5)")
    g.add_argument("--llm-concurrency", type=int, default=None, help="requests in flight (default 8)")
    g.add_argument("--llm-max-retries", type=int, default=None, help="retries on 429/5xx/timeouts (default 5)")
    g.add_argument("--llm-timeout", type=float, default=None, help="seconds per request (default 60)")


def _partial_args(p: argparse.ArgumentParser, launcher: bool) -> None:
    """The quick partial database's options (precompute/quick.py), for ``background`` and ``build``."""
    from .quick import QUICK_LAYER_STEP, QUICK_N_SEQUENCES

    g = p.add_argument_group("quick partial database first (precompute/quick.py)")
    if launcher:
        g.add_argument("--no-partial", action="store_true", help="build the full database alone, no partial one first")
    else:
        g.add_argument("--partial-first", action="store_true",
                       help="first build the quick partial database <db>.partial.duckdb (unless it or the full "
                            "database exists), then this one; `background` passes it")
    g.add_argument("--partial-n-sequences", type=int, default=QUICK_N_SEQUENCES,
                   help=f"sequences of the partial database (default {QUICK_N_SEQUENCES})")
    g.add_argument("--partial-layer-step", type=int, default=QUICK_LAYER_STEP,
                   help=f"the partial database describes every n-th of the build's layers (default {QUICK_LAYER_STEP})")


def _config(args) -> BuildConfig:
    from .llm import resolve_config

    llm = resolve_config(args.explainer, args.llm_base_url, args.llm_model, n=args.llm_n,
                         concurrency=args.llm_concurrency, max_retries=args.llm_max_retries, timeout=args.llm_timeout)
    if args.k < 1:
        raise MonitorError("--k must be at least 1 (20 or more is recommended).")
    at_least(args.batch_size, 1, "--batch-size")
    return BuildConfig(
        model=args.model, profile=args.profile, seq_len=args.seq_len, n_sequences=args.n_sequences,
        files=list(args.files), hf_dataset=args.hf_dataset, batch_size=args.batch_size, k=args.k,
        n_random=args.n_random, seed=args.seed, embedding_model=args.embedding_model, precision=args.precision,
        checkpoint_every=args.checkpoint_every, embed_chunk=args.embed_chunk, layers=args.layers, work_dir=args.work_dir, db=args.db, llm=llm,
    )


def _one_process_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--one-process", action="store_true",
                   help="run every stage in this process (by default each stage runs in a child process of its own, "
                        "so the build's peak memory is its largest stage's)")


def cmd_build(args) -> int:
    cfg = _config(args)
    build = Build(cfg, progress=not args.quiet, isolate=not args.one_process)
    if cfg.llm is not None and not args.quiet:
        print(f"explainer: {cfg.llm.explainer_id} at {cfg.llm.base_url} (cache {build.root / 'llm-cache.sqlite'})", flush=True)
    if args.fresh and build.root.exists():
        shutil.rmtree(build.root)
    at_least(args.partial_n_sequences, 1, "--partial-n-sequences")
    at_least(args.partial_layer_step, 1, "--partial-layer-step")
    t0 = time.time()
    if args.partial_first:
        from .quick import build_partial_then_full, partial_root

        if args.fresh:
            shutil.rmtree(partial_root(cfg.root), ignore_errors=True)
        path = build_partial_then_full(cfg, progress=not args.quiet, n_sequences=args.partial_n_sequences,
                                       layer_step=args.partial_layer_step, until=args.until,
                                       isolate=not args.one_process)
    else:
        path = build.run(until=args.until)
    if path:
        print(f"Built {path} in {time.time() - t0:.0f} s.")
    return 0


def cmd_background(args) -> int:
    from .background import start

    cfg = _config(args)
    argv = [a for a in args.build_argv if a != "--no-partial"]
    partial = None
    if not cfg.db_path.exists():  # a finished database needs no build, whatever its folder holds
        Build(cfg, progress=False).check_config()  # conflicting settings fail here, not in the log
        at_least(args.partial_n_sequences, 1, "--partial-n-sequences")
        at_least(args.partial_layer_step, 1, "--partial-layer-step")
        if not args.no_partial:
            from engine.loader import model_n_layers

            from .quick import quick_config

            n_layers = model_n_layers(cfg.model)
            quick = quick_config(cfg, n_layers, args.partial_n_sequences, args.partial_layer_step)
            if quick is not None:
                argv.append("--partial-first")
                partial = {"db": quick.db, "work_dir": quick.work_dir, "n_sequences": quick.n_sequences,
                           "layers": parse_layers(quick.layers, n_layers)}
    launch = start(argv, cfg.db_path, cfg.root, cfg.model, partial=partial)
    print(launch.sentence(cfg.db_path))
    return 0


def cmd_status(args) -> int:
    from cache.build_status import read_status

    build = Build(_config(args), progress=False)
    print(f"build folder: {build.root}")
    bg = read_status(build.cfg.db_path)
    if bg is not None:
        print(f"background build: {bg.sentence()}")
        if bg.chained:
            from cache.paths import partial_path

            quick = partial_path(build.cfg.db_path)
            print(f"partial database (built first, opened until the full one lands): {quick} "
                  f"({'present' if quick.exists() else 'missing'})")
    for row in build.status():
        mark = "done   " if row["done"] else "missing"
        extra = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("stage", "done"))
        print(f"  {row['stage']:<13} {mark} {extra}")
    ckpts = sorted(build.root.glob("shards/*/shard-*.ckpt.parquet"))
    for c in ckpts:
        from .collect import Collector

        info = Collector.read_info(c)
        print(f"  checkpoint {c.relative_to(build.root)}: {info['next_batch']} batches done")
    db = build.cfg.db_path
    print(f"database: {db} ({'present' if db.exists() else 'missing: run python -m precompute build --model ' + build.cfg.model})")
    return 0


def _shard_from_env(args) -> tuple[int, int]:
    if args.shard is not None:
        return args.shard, args.num_shards or 1
    if "WORLD_SIZE" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes
    return 0, args.num_shards or 1


def cmd_activations(args) -> int:
    shard, num = _shard_from_env(args)
    build = Build(_config(args), progress=not args.quiet)
    build.check_config()
    corpus = build.root / "corpus.parquet"
    if not build.done("corpus"):
        if shard == 0:
            build.run_corpus()
        else:
            while not (build.root / "corpus.done").exists():
                time.sleep(2)
    out = build.run_activations(shard, num)
    print(f"shard {shard}/{num}: {out}")
    return 0 if corpus.exists() else 1


def cmd_merge(args) -> int:
    build = Build(_config(args), progress=not args.quiet)
    if not build.complete_shard_sets():
        raise MonitorError("No complete set of shards yet: run every `python -m precompute activations` shard first.")
    path = build.run(until="write")
    print(f"Built {path}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m precompute", description="Build the neuron database.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run every stage (skipping finished ones)")
    _config_args(b)
    b.add_argument("--fresh", action="store_true", help="delete the build folder first")
    b.add_argument("--until", default="write", choices=STAGES, help="stop after this stage")
    _partial_args(b, launcher=False)
    _one_process_arg(b)
    b.set_defaults(func=cmd_build)
    g = sub.add_parser("background", help="start or resume the build as a background process (one at a time): "
                                          "a quick partial database first, then the full one")
    _config_args(g)
    _partial_args(g, launcher=True)
    _one_process_arg(g)
    g.set_defaults(func=cmd_background)
    s = sub.add_parser("status", help="what is built and what is missing")
    _config_args(s)
    s.set_defaults(func=cmd_status)
    a = sub.add_parser("activations", help="run one shard of the activation pass")
    _config_args(a)
    a.add_argument("--shard", type=int, default=None)
    a.add_argument("--num-shards", type=int, default=None)
    a.set_defaults(func=cmd_activations)
    m = sub.add_parser("merge", help="merge activation shards and finish the database")
    _config_args(m)
    m.set_defaults(func=cmd_merge)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.build_argv = argv[1:]  # `background` passes its options on to `build`
    return run_command(args.func, args, "interrupted; re-run the same command to resume.")


if __name__ == "__main__":
    sys.exit(main())
