"""``python -m engine``'s own commands: ``prepare`` (load, and for the embedded model convert once) and ``trace``.

Every :class:`~engine.errors.MonitorError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os

from .errors import MonitorError, run_command

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _chat_from_args(args) -> list[dict] | str:
    if args.raw:
        return args.prompt
    chat = []
    if args.system:
        chat.append({"role": "system", "content": args.system})
    chat.append({"role": "user", "content": args.prompt})
    return chat


def cmd_prepare(args) -> int:
    from .loader import load_model

    lm = load_model(args.model)
    print(f"{lm.name}: {lm.n_layers} layers × {lm.n_neurons} neurons, ready ({lm.source})")
    return 0


def cmd_trace(args) -> int:
    from .generate import generate
    from .loader import load_model
    from .trace import run_trace

    if args.top < 1:
        raise MonitorError("--top must be at least 1.")
    lm = load_model(args.model)
    chat = _chat_from_args(args)
    trace = run_trace(lm, chat, target_index=args.target_index, attribution=args.attribution if args.target_index is not None else None)
    skip = () if args.include_sink else (0,)
    result = {
        "model": lm.name,
        "tokens": trace.tokens,
        "top_activations": trace.top_activations(args.top, skip_tokens=skip),
    }
    if trace.attributions is not None:
        result["target_index"] = trace.target_index
        result["target_token"] = trace.tokens[trace.target_index]
        result["target_prob"] = trace.target_prob
        result["attribution"] = trace.attribution_kind
        result["top_attributions"] = trace.top_attributions(args.top)
    if args.generate:
        result["generated"] = generate(lm, chat, max_new_tokens=args.generate).text
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        _print_trace(result)
    return 0


def _print_trace(result: dict) -> None:
    tokens = result["tokens"]
    print(f"model: {result['model']}   tokens: {len(tokens)}")
    print(" ".join(f"[{i}]{t!r}" for i, t in enumerate(tokens)))
    tables = [("Top activations (raw; token 0 = attention sink skipped)", "top_activations")]
    if "top_attributions" in result:
        print(f"\ntarget: [{result['target_index']}] {result['target_token']!r}  p = {result['target_prob']:.4f}")
        tables.append((f"Top attributions ({result['attribution']})", "top_attributions"))
    for title, key in tables:
        print(f"\n{title}")
        print(f"{'layer':>5} {'neuron':>6} {'token':>5}  {'text':<14} {'value':>12}")
        for row in result[key]:
            print(f"{row['layer']:>5} {row['neuron']:>6} {row['token_index']:>5}  {tokens[row['token_index']]!r:<14} {row['value']:>12.5g}")
    if "generated" in result:
        print(f"\ngenerated: {result['generated']!r}")


def build_parser(extra_commands=()) -> argparse.ArgumentParser:
    """The parser; ``extra_commands`` are callables ``register(subparsers)`` that add sub-commands."""
    p = argparse.ArgumentParser(prog="python -m engine", description="Trace, attribute and steer Llama MLP neurons.")
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="load (and, for the embedded model, convert once) a model")
    prep.add_argument("--model", default="embedded")
    prep.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("trace", help="trace a prompt: tokens, top activations, attributions")
    tr.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id")
    tr.add_argument("--prompt", required=True, help="the user message (rendered with the chat template)")
    tr.add_argument("--system", default=None, help="an optional system prompt")
    tr.add_argument("--raw", action="store_true", help="trace the prompt as plain text, without the chat template")
    tr.add_argument("--target-index", type=int, default=None, help="token index to attribute to (negative counts from the end)")
    tr.add_argument("--attribution", choices=["logprob", "prob"], default="logprob")
    tr.add_argument("--top", type=int, default=20)
    tr.add_argument("--include-sink", action="store_true", help="rank token 0 (the attention sink) too")
    tr.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens greedily")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_trace)

    for register in extra_commands:
        register(sub)
    return p


def main(argv: list[str] | None = None, extra_commands=()) -> int:
    """Parse ``argv`` and run the command. ``extra_commands``: callables ``register(subparsers)``
    that add sub-commands living outside the engine (``engine/__main__.py`` passes the
    experiment command of :mod:`concepts.cli`)."""
    args = build_parser(extra_commands).parse_args(argv)
    return run_command(args.func, args)
