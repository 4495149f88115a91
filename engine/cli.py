"""``python -m engine``'s own commands: ``prepare`` (load, and for the embedded model convert once), ``trace``
and ``synth`` (a random-weight model with a real model's neuron count, :mod:`engine.synth`).

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


def cmd_synth(args) -> int:
    from .loader import load_model
    from .synth import check_activations, shape, write_model

    sh = shape(args.shape)
    out = write_model(args.shape, args.out, hidden=args.hidden, seed=args.seed, force=args.force)
    lm = load_model(str(out))
    stats = check_activations(lm)
    print(f"{out}: synthetic {sh.name} ({lm.n_layers} layers × {lm.n_neurons} = {lm.n_layers * lm.n_neurons:,} neurons, "
          f"hidden {lm.config.hidden_size}, seed {args.seed}); activations finite, std {stats['std']:.3g}")
    return 0


def check_objective_args(args, require_objective: bool = False) -> None:
    """Option errors that need no model (checked before it loads)."""
    if (args.answer is None) != (args.versus is None):
        raise MonitorError("Answer-level attribution needs both --answer TEXT and --versus TEXT.")
    if args.answer is not None and (args.target_index is not None or args.distractor is not None):
        raise MonitorError("Use either --answer/--versus or --target-index/--distractor, not both.")
    if args.faithfulness < 0:
        raise MonitorError("--faithfulness must be 0 or more.")
    if require_objective and args.answer is None and args.target_index is None and args.distractor is None:
        raise MonitorError("Pick what to attribute to: --target-index N (optionally --distractor), or --answer/--versus.")


def trace_from_args(lm, chat, args):
    """The trace the objective options ask for (:func:`add_objective_args`, checked by
    :func:`check_objective_args`): a target token, with a distractor for the contrastive
    attribution, or an answer pair; none: activations only."""
    from .trace import run_trace

    if args.answer is not None:
        from .attribution import answer_objective

        rendered, objective = answer_objective(lm, chat, args.answer, args.versus, args.stem)
        return run_trace(lm, chat, rendered=rendered, objective=objective)
    attributed = args.target_index is not None or args.distractor is not None
    return run_trace(lm, chat, target_index=args.target_index, distractor=args.distractor,
                     attribution=args.attribution if attributed else None)


def add_objective_args(p) -> None:
    """The prompt, model and attribution-objective options shared by ``trace`` and ``lint``."""
    p.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id")
    p.add_argument("--prompt", required=True, help="the user message (rendered with the chat template)")
    p.add_argument("--system", default=None, help="an optional system prompt")
    p.add_argument("--raw", action="store_true", help="trace the prompt as plain text, without the chat template")
    p.add_argument("--target-index", type=int, default=None, help="token index to attribute to (negative counts from the end)")
    p.add_argument("--attribution", choices=["logprob", "prob"], default="logprob")
    p.add_argument("--distractor", default=None,
                   help="contrastive attribution: log p(target) − log p(DISTRACTOR) at the same position; a token "
                        "string such as ' 8' (several tokens: the first that differs from the target) or id:N")
    p.add_argument("--answer", default=None, help="answer-level attribution: L(ANSWER) − L(VERSUS), complete-answer "
                                                  "log-probs after the prompt and --stem")
    p.add_argument("--versus", default=None, help="the answer to contrast --answer with")
    p.add_argument("--stem", default="", help="the reply stem before the answers (e.g. 'The bigger number is ')")
    p.add_argument("--faithfulness", type=int, default=0, metavar="K",
                   help="also suppress each of the top K attribution cells and compare the measured change with "
                        "the attribution's prediction")


def faithfulness_from_args(lm, trace, k: int, quiet: bool, extra=()) -> dict:
    """:func:`engine.effects.faithfulness` with a tqdm bar (off when ``quiet``), as a dict."""
    from tqdm import tqdm

    from .effects import faithfulness

    with tqdm(total=k + len(extra), desc="suppressing", unit="group", disable=quiet, leave=False) as bar:
        return faithfulness(lm, trace, k, extra=extra, progress=bar.update).to_dict()


def cmd_trace(args) -> int:
    from .generate import generate
    from .loader import load_model

    if args.top < 1:
        raise MonitorError("--top must be at least 1.")
    check_objective_args(args)
    lm = load_model(args.model)
    chat = _chat_from_args(args)
    trace = trace_from_args(lm, chat, args)
    skip = () if args.include_sink else (0,)
    result = {
        "model": lm.name,
        "tokens": trace.tokens,
        "top_activations": trace.top_activations(args.top, skip_tokens=skip),
    }
    if trace.has_attribution:
        if trace.target_index is not None:
            result["target_index"] = trace.target_index
            result["target_token"] = trace.tokens[trace.target_index]
            result["target_prob"] = trace.target_prob
        result["attribution"] = trace.attribution_kind
        result["objective"] = trace.objective.label
        result["objective_value"] = trace.objective_value
        result["top_attributions"] = trace.top_attributions(args.top)
        if args.faithfulness:
            result["faithfulness"] = faithfulness_from_args(lm, trace, args.faithfulness, args.json)
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
        if "target_index" in result:
            print(f"\ntarget: [{result['target_index']}] {result['target_token']!r}  p = {result['target_prob']:.4f}")
        print(f"objective: {result['objective']} = {result['objective_value']:.4f}")
        tables.append((f"Top attributions ({result['attribution']})", "top_attributions"))
    for title, key in tables:
        print(f"\n{title}")
        print(f"{'layer':>5} {'neuron':>6} {'token':>5}  {'text':<14} {'value':>12}")
        for row in result[key]:
            print(f"{row['layer']:>5} {row['neuron']:>6} {row['token_index']:>5}  {tokens[row['token_index']]!r:<14} {row['value']:>12.5g}")
    if "faithfulness" in result:
        fa = result["faithfulness"]
        print(f"\nFaithfulness: suppressing each cell, predicted (−A) vs measured Δ objective; "
              f"Spearman ρ = {fa['spearman']:.3f}")
        for row in fa["rows"]:
            print(f"  {row['group']:<28} predicted {row['predicted']:>10.4g}  measured {row['measured']:>10.4g}")
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
    add_objective_args(tr)
    tr.add_argument("--top", type=int, default=20)
    tr.add_argument("--include-sink", action="store_true", help="rank token 0 (the attention sink) too")
    tr.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens greedily")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_trace)

    from .synth import DEFAULT_HIDDEN, SHAPES

    sy = sub.add_parser("synth", help="write a random-weight Llama with a real model's neuron count (scale rehearsals)")
    sy.add_argument("--shape", required=True, choices=sorted(SHAPES), help="the MLP shape to copy")
    sy.add_argument("--out", required=True, help="the model folder to write")
    sy.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help="residual stream width (a multiple of 64)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    sy.set_defaults(func=cmd_synth)

    for register in extra_commands:
        register(sub)
    return p


def main(argv: list[str] | None = None, extra_commands=()) -> int:
    """Parse ``argv`` and run the command. ``extra_commands``: callables ``register(subparsers)``
    that add sub-commands living outside the engine (``engine/__main__.py`` passes the
    experiment command of :mod:`concepts.cli`)."""
    args = build_parser(extra_commands).parse_args(argv)
    return run_command(args.func, args)
