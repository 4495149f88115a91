"""Steering experiments with random controls and confidence intervals.

The headline experiment (DESIGN.md): "Which is bigger: 9.8 or 9.11?". Suppressing the
neurons that match "Bible verses" and "dates" was reported to help Llama-3.1-8B; a
replication found it fragile. So every run here scores the same prompts under:

* ``baseline``: no steering;
* each concept spec alone, and the union of all specs;
* ``--controls`` random-neuron controls: as many neurons per layer as the union, same
  mode and token range (:func:`engine.concepts.random_control`), one seed each.

Scores per prompt, after an assistant reply stem (``prefix``, "The bigger number is "):

* **forced choice**: correct iff ``log p(correct | prompt, prefix) > log p(wrong | …)``,
  each the sum of its tokens' log-probabilities;
* **greedy**: greedy decoding (at most ``max_new_tokens``) from the same stem; correct iff
  the first number in the reply equals the correct answer (or, for non-numeric answers,
  the correct text appears before the wrong one).

Statistics (:mod:`engine.stats`): accuracy with 95% bootstrap intervals, exact McNemar
tests of each condition against the baseline and against every control.

Speed: prompts are grouped by rendered length (same length and last-user span ⇒ the
same position mask, so one compiled intervention set and no padding). The tokens every
prompt shares (system prompt, template, "Which is bigger: ") run once per group into a
KV cache; per batch one forward over the rest of prompt + stem extends a copy of it and
serves both scores: the candidates' tokens run on a copy repeated ×2, greedy decoding
continues on the original. Each prompt thus costs about 25 token positions plus 2 × 3
candidate positions and a few decoding steps, instead of 2 × 50 + 8 unbatched. Measured:
``python -m benchmarks.steering --experiment``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import MonitorError

DECIMALS_TEMPLATE = "Which is bigger: {a} or {b}?"
DECIMALS_PREFIX = "The bigger number is "
DEFAULT_MAX_NEW_TOKENS = 8
DEFAULT_BATCH = 32
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# --------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Item:
    """One forced-choice question: the user message and the two answers."""

    prompt: str
    correct: str
    wrong: str


def decimal_items(template: str = DECIMALS_TEMPLATE, x_values: Sequence[int] = range(1, 11),
                  y_values: Sequence[int] | None = None, z_values: Sequence[int] | None = None,
                  larger: str = "shorter") -> list[Item]:
    """Every "X.Y vs X.Z" question of one kind, both orders.

    ``X.Y`` has one digit after the point, ``X.Z`` two (``Z`` not a multiple of 10).

    * ``larger="shorter"`` (the headline set): ``X.Y > X.Z`` (``10·Y > Z``), e.g. 9.8 vs
      9.11. The defaults (X = 1..10, Y = 2..9, Z = 11..18, so the two-digit one always
      *looks* bigger) give 10 × 8 × 8 = 640 pairs, 1,280 questions with both orders, the
      size the reference used.
    * ``larger="longer"`` (the mirror image, a check for a mere bias toward one-digit
      answers): ``X.Z > X.Y`` (``Z > 10·Y``), e.g. 9.2 vs 9.35; defaults Y = 1..8,
      Z = 11..99: 7,920 questions.

    ``template`` must contain ``{a}`` and ``{b}``.
    """
    if "{a}" not in template or "{b}" not in template:
        raise MonitorError("The template must contain {a} and {b}, e.g. \"Which is bigger: {a} or {b}?\".")
    if larger not in ("shorter", "longer"):
        raise MonitorError(f"Unknown decimal set {larger!r}: use shorter (9.8 vs 9.11) or longer (9.2 vs 9.35).")
    if y_values is None:
        y_values = range(2, 10) if larger == "shorter" else range(1, 9)
    if z_values is None:
        z_values = range(11, 19) if larger == "shorter" else range(11, 100)
    items = []
    for x in x_values:
        for y in y_values:
            for z in z_values:
                if not (1 <= y <= 9 and 10 <= z <= 99 and z % 10):
                    continue
                if (10 * y > z) != (larger == "shorter"):
                    continue
                big, small = (f"{x}.{y}", f"{x}.{z}") if larger == "shorter" else (f"{x}.{z}", f"{x}.{y}")
                for a, b in ((big, small), (small, big)):
                    try:
                        prompt = template.format(a=a, b=b)
                    except (KeyError, IndexError, ValueError) as err:
                        raise MonitorError(f"The template {template!r} has a field other than {{a}} and {{b}}: "
                                           "escape literal braces as {{ }}.") from err
                    items.append(Item(prompt, big, small))
    return items


def sample_items(items: Sequence[Item], n: int | None, seed: int = 0) -> list[Item]:
    """``n`` items drawn without replacement with ``random.Random(seed)`` (all when n is None or ≥ len)."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise MonitorError("--n must be at least 1.")
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def load_items(path: str | Path) -> list[Item]:
    """Items from a JSON-lines file, one ``{"prompt": …, "correct": …, "wrong": …}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise MonitorError(f"No prompt file at {path}: pass --file with a JSON-lines file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MonitorError(f"Cannot read {path} as UTF-8 text ({err}).") from err
    return parse_items(text, str(path))


def parse_items(text: str, name: str = "prompts.jsonl") -> list[Item]:
    """Items from JSON-lines text (an upload or a paste); errors name ``name`` and the line."""
    path = name
    items = []
    for i, line in enumerate(str(text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as err:
            raise MonitorError(f"{path}:{i} is not valid JSON ({err.msg}): write one "
                               "{\"prompt\": …, \"correct\": …, \"wrong\": …} object per line.") from err
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k].strip()
                                             for k in ("prompt", "correct", "wrong")):
            raise MonitorError(f"{path}:{i} needs non-empty string fields prompt, correct and wrong.")
        if d["correct"].strip() == d["wrong"].strip():
            raise MonitorError(f"{path}:{i} has the same correct and wrong answer.")
        items.append(Item(d["prompt"], d["correct"].strip(), d["wrong"].strip()))
    if not items:
        raise MonitorError(f"{path} has no prompts: write one JSON object per line.")
    return items


def judge(reply: str, correct: str, wrong: str) -> str:
    """``"correct"``, ``"wrong"`` or ``"other"`` for a greedy reply.

    Numeric answers: the first number in the reply decides (compared as numbers).
    Otherwise: whichever answer text occurs first (case-insensitive).
    """
    try:
        c, w = float(correct), float(wrong)
        numeric = True
    except ValueError:
        numeric = False
    if numeric:
        m = _NUMBER.search(reply)
        if not m:
            return "other"
        v = float(m.group(0))
        return "correct" if v == c else "wrong" if v == w else "other"
    low = reply.lower()
    ic, iw = low.find(correct.lower()), low.find(wrong.lower())
    if ic < 0 and iw < 0:
        return "other"
    if iw < 0 or (0 <= ic < iw) or (ic == iw and len(correct) > len(wrong)):
        return "correct"
    return "wrong"


# --------------------------------------------------------------------------- batched scoring
@dataclass
class _Row:
    index: int
    ids: list[int]  # prompt + shared prefix
    prompt_len: int
    span: tuple[int, int]
    cands: tuple[list[int], list[int]]  # correct, wrong: tokens after the shared prefix
    numeric: bool


@dataclass
class Prepared:
    """Items rendered and tokenised once, grouped by (prompt length, last-user span)."""

    items: list[Item]
    rows: list[_Row]
    groups: dict[tuple, list[int]]  # key -> row indices
    tail: list[int]  # prefix tokens not shared with the candidates (usually empty)
    rendered: dict[tuple, object]  # key -> a RenderedChat of that group (for compiling interventions)
    prefix: str
    common: int = 0  # leading tokens every row shares (system prompt, template): computed once per group


def prepare(lm, items: Sequence[Item], prefix: str = DECIMALS_PREFIX) -> Prepared:
    """Render every item's chat and tokenise its candidates after ``prefix``.

    Each candidate is tokenised together with the prefix (as the model would see it);
    the longest prefix of the stem's tokens that every candidate shares is computed once
    and run with the prompt, the rest belongs to the candidates.
    """
    from .chat import render_chat

    tok = lm.tokenizer
    if not items:
        raise MonitorError("No prompts to score.")
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    fulls = []
    for it in items:
        pair = []
        for cand in (it.correct, it.wrong):
            ids = tok(prefix + cand, add_special_tokens=False)["input_ids"]
            if len(ids) == 0:
                raise MonitorError(f"The answer {cand!r} tokenises to nothing.")
            pair.append(ids)
        fulls.append(pair)
    shared = len(pre)
    for pair in fulls:
        for ids in pair:
            j = 0
            while j < min(shared, len(ids) - 1) and ids[j] == pre[j]:
                j += 1
            shared = j
    rows, groups, rendered = [], {}, {}
    for i, (it, pair) in enumerate(zip(items, fulls)):
        r = render_chat(tok, [{"role": "user", "content": it.prompt}], add_generation_prompt=True,
                        max_tokens=lm.max_context)
        span = r.last_turn("user")
        ids = r.input_ids.tolist() + pre[:shared]
        key = (len(r), span)
        rows.append(_Row(i, ids, len(r), span, (pair[0][shared:], pair[1][shared:]), _is_numeric(it)))
        groups.setdefault(key, []).append(i)
        rendered.setdefault(key, r)
    first = rows[0].ids
    common = min(len(r.ids) for r in rows) - 1
    for r in rows:
        j = 0
        while j < common and r.ids[j] == first[j]:
            j += 1
        common = j
    return Prepared(list(items), rows, groups, pre[shared:], rendered, prefix, common)


def _is_numeric(it: Item) -> bool:
    try:
        float(it.correct), float(it.wrong)
        return True
    except ValueError:
        return False


@dataclass
class Scores:
    """Per-item results of one condition."""

    fc_correct: np.ndarray  # bool [n]
    margin: np.ndarray  # float [n]: log p(correct) − log p(wrong)
    greedy: list[str]  # replies ("" when greedy is off)
    greedy_verdict: list[str]  # correct / wrong / other
    seconds: float

    @property
    def greedy_correct(self) -> np.ndarray:
        return np.array([v == "correct" for v in self.greedy_verdict], bool)


def score(lm, prep: Prepared, interventions=None, quantiles=None, greedy: bool = True,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH,
          progress: Callable[[int], None] | None = None) -> Scores:
    """Forced-choice and greedy scores of every prepared item under ``interventions``.

    Per group (same rendered length and last-user span) the tokens every prompt shares
    (system prompt, template, the question's first words) run once into a KV cache. Per
    batch of up to ``batch_size`` prompts of the group:

    1. one forward over the rest of prompt + stem on a copy of that cache (repeated to the
       batch); its last logits give each
       candidate's first token log-probability and the first greedy token;
    2. the cache, copied and repeated ×2, runs both candidates' remaining tokens (right
       padded; causal attention keeps padding from touching real tokens);
    3. greedy decoding continues on the original cache until every reply holds a whole
       number (numeric answers), an end-of-sequence token, or ``max_new_tokens``.

    Interventions see absolute positions (``NeuronHooks.offset``), so prompt ranges steer
    the prompt and ``+generated`` ranges the stem, candidates and reply, exactly as
    :func:`engine.generate.sequence_logprob` and :func:`engine.generate.generate` do.
    """
    import torch
    from transformers import DynamicCache

    from .generate import eos_ids
    from .hooks import NeuronHooks
    from .steering import compile_interventions

    t0 = time.perf_counter()
    n = len(prep.rows)
    margin = np.zeros(n)
    fc = np.zeros(n, bool)
    replies = [""] * n
    verdicts = ["other"] * n
    stop = eos_ids(lm)
    device = lm.device
    common = prep.common
    for key, members in prep.groups.items():
        compiled = compile_interventions(interventions or [], prep.rendered[key], lm.n_layers, lm.n_neurons,
                                         quantiles, device=device, dtype=lm.dtype)
        with lm.lock, torch.inference_mode(), NeuronHooks(lm, interventions=compiled) as hooks:
            head = None
            if common:
                # The shared head (system prompt, template, start of the question) once per group.
                head = DynamicCache()
                hooks.offset = 0
                head_ids = torch.tensor([prep.rows[members[0]].ids[:common]], dtype=torch.long, device=device)
                lm.model(input_ids=head_ids, cache=head, use_cache=True, logits_to_keep=1)
            for start in range(0, len(members), batch_size):
                batch = [prep.rows[i] for i in members[start:start + batch_size]]
                _score_batch(lm, hooks, head, common, batch, prep, greedy, max_new_tokens, stop,
                             margin, fc, replies, verdicts)
                if progress is not None:
                    progress(len(batch))
    return Scores(fc, margin, replies, verdicts, time.perf_counter() - t0)



def _score_batch(lm, hooks, head, common, batch, prep, greedy, max_new_tokens, stop, margin, fc, replies, verdicts):
    """One batch of :func:`score` (same rendered length): fills margin, fc, replies, verdicts in place."""
    import torch
    from transformers import DynamicCache

    device, tok, tail = lm.device, lm.tokenizer, prep.tail
    B = len(batch)
    ids = torch.tensor([r.ids for r in batch], dtype=torch.long, device=device)  # [B, T0]
    T0 = ids.shape[1]
    if head is not None:
        cache = copy.deepcopy(head)
        cache.batch_repeat_interleave(B)
    else:
        cache = DynamicCache()
    hooks.offset = common
    last = lm.model(input_ids=ids[:, common:], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    logp0 = torch.log_softmax(last.float(), dim=-1)  # [B, V]
    cands = [c for r in batch for c in r.cands]  # [2B] token lists: correct, wrong per row
    lp = torch.stack([logp0[i // 2, c[0]] for i, c in enumerate(cands)])  # [2B]
    longest = max(len(c) for c in cands)
    if longest > 1:
        cc = copy.deepcopy(cache) if greedy and max_new_tokens > 0 else cache
        cc.batch_repeat_interleave(2)
        # Feed c[:-1], right-padded by repeating the last real token (causal: padding never
        # reaches a real position).
        inp = torch.tensor([(c[:-1] + [c[-1]] * longest)[: longest - 1] for c in cands], dtype=torch.long,
                           device=device)  # [2B, M-1]
        hooks.offset = T0
        logp = torch.log_softmax(lm.model(input_ids=inp, cache=cc, use_cache=True).logits.float(), dim=-1)
        for i, c in enumerate(cands):
            if len(c) > 1:
                tgt = torch.tensor(c[1:], device=device)
                lp[i] = lp[i] + logp[i, torch.arange(len(c) - 1, device=device), tgt].sum()
        del cc, logp
    lp = lp.view(B, 2).double().cpu().numpy()
    for r, (a, b) in zip(batch, lp):
        margin[r.index] = a - b
        fc[r.index] = a > b
    if not greedy or max_new_tokens <= 0:
        return
    pos = T0
    if tail:
        hooks.offset = pos
        t_ids = torch.tensor([tail] * B, dtype=torch.long, device=device)
        last = lm.model(input_ids=t_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        pos += len(tail)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = last.float().argmax(dim=-1).tolist()
        for b in range(B):
            if done[b]:
                continue
            out[b].append(nxt[b])
            if nxt[b] in stop:
                done[b] = True
            elif batch[b].numeric and _reply_has_number(tok.decode(out[b], skip_special_tokens=True)):
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        hooks.offset = pos
        last = lm.model(input_ids=torch.tensor(nxt, device=device)[:, None], cache=cache,
                        use_cache=True).logits[:, -1]
        pos += 1
    for r, o in zip(batch, out):
        text = tok.decode([i for i in o if i not in stop], skip_special_tokens=True)
        it = prep.items[r.index]
        replies[r.index] = text
        verdicts[r.index] = judge(text, it.correct, it.wrong)

def _reply_has_number(text: str) -> bool:
    """True once the reply's first number is complete (something other than a digit follows it,
    and not a '.' that could still lead to more digits)."""
    m = _NUMBER.search(text)
    if not m:
        return False
    after = text[m.end():]
    if not after:
        return False
    if after[0] == ".":
        return len(after) > 1 and not after[1].isdigit()
    return True


# --------------------------------------------------------------------------- conditions
@dataclass
class Condition:
    """One steering setting of an experiment."""

    name: str
    kind: str  # baseline | spec | union | control
    interventions: list = field(default_factory=list)
    seed: int | None = None

    @property
    def n_neurons(self) -> int:
        return len({(l, n) for iv in self.interventions for l, n, _ in iv.neurons})

    def per_layer(self) -> dict[int, int]:
        from .concepts import layer_counts

        return layer_counts((l, n) for iv in self.interventions for l, n, _ in iv.neurons)


def build_conditions(selections, n_neurons: int, controls: int = 3, seed: int = 0) -> list[Condition]:
    """baseline, each selection alone, their union (when more than one), and ``controls``
    random controls matching the union per layer (seeds ``seed, seed+1, …``)."""
    from .concepts import random_control, union

    conds = [Condition("baseline", "baseline")]
    sels = [s for s in selections if s.spec.enabled]
    for s in sels:
        conds.append(Condition(s.spec.label, "spec", union([s]).interventions))
    if not sels:
        return conds
    u = union(sels)
    if len(sels) > 1:
        conds.append(Condition("union of " + " + ".join(s.spec.concept for s in sels), "union", u.interventions))
    for i in range(int(controls)):
        conds.append(Condition(f"random control {i + 1} (seed {seed + i})", "control",
                               random_control(u.interventions, n_neurons, seed + i), seed + i))
    return conds


# --------------------------------------------------------------------------- running and reporting
@dataclass
class ExperimentResult:
    items: list[Item]
    conditions: list[Condition]
    scores: list[Scores]
    config: dict
    seconds: float


def run_experiment(lm, items: Sequence[Item], conditions: Sequence[Condition], quantiles=None,
                   prefix: str = DECIMALS_PREFIX, greedy: bool = True, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = DEFAULT_BATCH, config: dict | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> ExperimentResult:
    """Score ``items`` under every condition. ``progress(condition name, done, total)``."""
    t0 = time.perf_counter()
    prep = prepare(lm, items, prefix)
    scores = []
    for cond in conditions:
        done = [0]

        def tick(k, name=cond.name):
            done[0] += k
            if progress is not None:
                progress(name, done[0], len(items))

        scores.append(score(lm, prep, cond.interventions, quantiles, greedy, max_new_tokens, batch_size, tick))
    cfg = dict(config or {})
    cfg.update({"prefix": prefix, "greedy": greedy, "max_new_tokens": max_new_tokens, "n": len(items)})
    return ExperimentResult(list(items), list(conditions), scores, cfg, time.perf_counter() - t0)


def analyze(result: ExperimentResult, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracies with bootstrap intervals and paired tests, JSON-ready.

    For each condition and metric (``forced_choice``, ``greedy``): accuracy and its
    percentile-bootstrap interval; against the baseline: the difference, its paired
    bootstrap interval and McNemar's exact p; for spec and union conditions, against the
    controls: the difference from the controls' mean per-prompt accuracy (paired
    bootstrap interval) and McNemar's p against each control (``p_max`` is the largest:
    below α, the condition differs from *every* control at that level).
    """
    from .stats import accuracy_summary, mcnemar_exact, paired_bootstrap_diff_ci

    metrics = {"forced_choice": [s.fc_correct for s in result.scores]}
    if result.config.get("greedy", True):
        metrics["greedy"] = [s.greedy_correct for s in result.scores]
    base_i = next(i for i, c in enumerate(result.conditions) if c.kind == "baseline")
    ctrl_i = [i for i, c in enumerate(result.conditions) if c.kind == "control"]
    rows = []
    for i, (cond, sc) in enumerate(zip(result.conditions, result.scores)):
        row = {"name": cond.name, "kind": cond.kind, "neurons": cond.n_neurons, "per_layer": cond.per_layer(),
               "seconds": sc.seconds, "mean_margin": float(np.mean(sc.margin))}
        if cond.seed is not None:
            row["seed"] = cond.seed
        for metric, vecs in metrics.items():
            x = vecs[i]
            m = accuracy_summary(x, level, seed=seed)
            if i != base_i:
                b = vecs[base_i]
                m["vs_baseline"] = {"diff": float(x.mean() - b.mean()),
                                    "ci": paired_bootstrap_diff_ci(x, b, level, seed=seed), **mcnemar_exact(x, b)}
            if cond.kind in ("spec", "union") and ctrl_i:
                cm = np.mean([vecs[j] for j in ctrl_i], axis=0)
                tests = [mcnemar_exact(x, vecs[j]) for j in ctrl_i]
                m["vs_controls"] = {"diff": float(x.mean() - cm.mean()),
                                    "ci": paired_bootstrap_diff_ci(x, cm, level, seed=seed),
                                    "p": [t["p"] for t in tests], "p_max": max(t["p"] for t in tests)}
            if metric == "greedy":
                m["other_rate"] = float(np.mean([v == "other" for v in result.scores[i].greedy_verdict]))
            row[metric] = m
        rows.append(row)
    summary = {"config": result.config, "n": len(result.items), "seconds": result.seconds, "conditions": rows}
    if ctrl_i:
        summary["controls"] = {
            metric: {"mean": float(np.mean([vecs[j].mean() for j in ctrl_i])),
                     "min": float(min(vecs[j].mean() for j in ctrl_i)),
                     "max": float(max(vecs[j].mean() for j in ctrl_i))}
            for metric, vecs in metrics.items()}
    summary["verdict"] = verdict(summary)
    return summary


def verdict(summary: dict, alpha: float = 0.05) -> str:
    """A plain-language reading of the forced-choice results, controls included."""
    rows = summary["conditions"]
    base = next(r for r in rows if r["kind"] == "baseline")["forced_choice"]["acc"]
    steered = [r for r in rows if r["kind"] in ("spec", "union")]
    if not steered:
        return f"Baseline forced-choice accuracy {base:.1%} (no steering conditions)."
    parts = [f"Baseline forced-choice accuracy {base:.1%}."]
    ctrl = summary.get("controls", {}).get("forced_choice")
    if ctrl:
        parts.append(f"Random controls: {ctrl['min']:.1%}–{ctrl['max']:.1%} (mean {ctrl['mean']:.1%}).")
    for r in steered:
        fc = r["forced_choice"]
        vb = fc["vs_baseline"]
        text = f"{r['name']}: {fc['acc']:.1%} ({vb['diff']:+.1%} vs baseline, McNemar p = {vb['p']:.3g}"
        if "vs_controls" in fc:
            vc = fc["vs_controls"]
            text += f"; {vc['diff']:+.1%} vs the controls' mean, largest p vs a control = {vc['p_max']:.3g}"
        text += ")"
        word = "better" if vb["diff"] > 0 else "worse"
        if vb["p"] < alpha and "vs_controls" in fc and fc["vs_controls"]["p_max"] < alpha \
                and (fc["vs_controls"]["diff"] > 0) == (vb["diff"] > 0):
            text += f" — significantly {word} than the baseline and than every random control."
        elif vb["p"] < alpha and "vs_controls" in fc:
            text += f" — {word} than the baseline, but not significantly different from every random control of " \
                    "the same size, so the change is not shown to be specific to the concept."
        elif vb["p"] < alpha:
            text += f" — {word} than the baseline (no controls run)."
        else:
            text += " — no significant change from the baseline."
        parts.append(text)
    parts.append("(Exact McNemar p-values, two-sided, per comparison, not corrected for multiple comparisons.)")
    return " ".join(parts)


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def to_markdown(summary: dict) -> str:
    """The results as a Markdown table plus the runtime and the verdict."""
    has_greedy = any("greedy" in r for r in summary["conditions"])
    head = ["condition", "neurons", "forced-choice acc % [95% CI]", "Δ vs base (pp)", "p vs base", "p vs controls (max)",
            "mean logp(correct)−logp(wrong)"]
    if has_greedy:
        head += ["greedy acc % [95% CI]", "Δ vs base (pp)", "p vs base", "p vs controls (max)"]
    head.append("time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["conditions"]:
        cells = [r["name"], str(r["neurons"])]
        metrics = ["forced_choice"] + (["greedy"] if has_greedy else [])
        for metric in metrics:
            m = r.get(metric)
            if m is None:
                cells += ["–"] * 4
                continue
            vb, vc = m.get("vs_baseline"), m.get("vs_controls")
            cells += [f"{_pct(m['acc'])} [{_pct(m['lo'])}, {_pct(m['hi'])}]",
                      f"{100 * vb['diff']:+.1f}" if vb else "",
                      _p(vb["p"]) if vb else "",
                      _p(vc["p_max"]) if vc else ""]
            if metric == "forced_choice":
                cells.append(f"{r['mean_margin']:+.3f}")
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    cfg = summary["config"]
    lines.append("")
    lines.append(f"n = {summary['n']} prompts; model {cfg.get('model', '?')}; database {cfg.get('db', '–')}; "
                 f"seed {cfg.get('seed', '?')}; stem {cfg.get('prefix', '')!r}; "
                 f"greedy ≤ {cfg.get('max_new_tokens')} tokens; total runtime {summary['seconds']:.0f} s.")
    lines.append("")
    lines.append(summary["verdict"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def register_cli(sub) -> None:
    """Add ``experiment`` to ``python -m engine``'s sub-commands."""
    ex = sub.add_parser("experiment", help="steering experiment with random controls and confidence intervals",
                        description="Score prompts under baseline, concept steering, their union and random "
                                    "controls; print a Markdown table (or JSON with --json).")
    ex.add_argument("which", choices=["decimals", "custom"], help="decimals: X.Y vs X.Z; custom: --file prompts.jsonl")
    ex.add_argument("--model", default="embedded", help="'embedded', a local folder, or a hub id")
    ex.add_argument("--db", default=None, help="neuron database (default: cache/<model>.duckdb)")
    ex.add_argument("--steer", action="append", default=[], metavar="SPEC",
                    help="'concept:mode:k[:key=value…]', e.g. 'Bible verses:suppress:500' (repeatable)")
    ex.add_argument("--steer-url", default=None, metavar="STRING", help="specs from a shared steering link (c1.…)")
    ex.add_argument("--controls", type=int, default=3, help="random controls matching the union per layer")
    ex.add_argument("--n", type=int, default=None, help="sample this many prompts (seeded); default all")
    ex.add_argument("--seed", type=int, default=0, help="seed for sampling, controls and bootstrap")
    ex.add_argument("--template", default=DECIMALS_TEMPLATE, help="decimals prompt with {a} and {b}")
    ex.add_argument("--larger", choices=["shorter", "longer"], default="shorter",
                    help="decimals: the larger number is the shorter one (9.8 vs 9.11, default) or the longer one "
                         "(9.2 vs 9.35: checks for a mere bias toward one-digit answers)")
    ex.add_argument("--prefix", default=None, help=f"assistant reply stem (decimals default {DECIMALS_PREFIX!r}, "
                                                    "custom default '')")
    ex.add_argument("--file", default=None, help="custom: JSON lines of {prompt, correct, wrong}")
    ex.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ex.add_argument("--no-greedy", action="store_true", help="forced choice only")
    ex.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ex.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores)")
    ex.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    ex.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown table to PATH")
    ex.add_argument("--per-item", action="store_true", help="include per-prompt results in the JSON")
    ex.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    import sys

    from .concepts import ConceptSpec, specs_from_url
    from .loader import load_model

    if args.controls < 0:
        raise MonitorError("--controls must be 0 or more.")
    if args.max_new_tokens < 0:
        raise MonitorError("--max-new-tokens must be 0 or more.")
    if args.batch_size < 1:
        raise MonitorError("--batch-size must be at least 1.")
    if args.threads is not None:
        if args.threads < 1:
            raise MonitorError("--threads must be at least 1.")
        import torch

        torch.set_num_threads(args.threads)
    specs = [ConceptSpec.parse(s) for s in args.steer]
    if args.steer_url:
        specs += specs_from_url(args.steer_url)
    if args.which == "decimals":
        if args.file:
            raise MonitorError("--file is for `experiment custom`; the decimals experiment builds its own prompts.")
        items = decimal_items(args.template, larger=args.larger)
        prefix = DECIMALS_PREFIX if args.prefix is None else args.prefix
    else:
        if not args.file:
            raise MonitorError("`experiment custom` needs --file prompts.jsonl "
                               "(one {\"prompt\": …, \"correct\": …, \"wrong\": …} per line).")
        items = load_items(args.file)
        prefix = "" if args.prefix is None else args.prefix
    items = sample_items(items, args.n, args.seed)
    db = db_label = None
    selections, quantiles = [], None
    if specs:  # the database first: a missing one should fail before the model loads
        from cache.db import open_database
        from cache.paths import db_path

        path = Path(args.db) if args.db else db_path(args.model)
        db = open_database(path, model=args.model)
        db_label = str(path)
    lm = load_model(args.model)
    if db is not None:
        from cache.concepts import select_all, steering_quantiles

        if (db.n_layers, db.n_neurons) != (lm.n_layers, lm.n_neurons):
            raise MonitorError(f"{path} describes a {db.n_layers}×{db.n_neurons} model but {lm.name} is "
                               f"{lm.n_layers}×{lm.n_neurons}: pass the database built for this model with --db.")
        selections = select_all(db, specs)
        if any(s.spec.mode == "strengthen" for s in selections):
            quantiles = steering_quantiles(db)
    conditions = build_conditions(selections, lm.n_neurons, args.controls, args.seed)
    import torch

    config = {"experiment": args.which, "model": lm.name, "db": db_label, "seed": args.seed,
              "threads": torch.get_num_threads(),
              "specs": [s.to_dict() for s in specs], "template": args.template if args.which == "decimals" else None,
              "larger": args.larger if args.which == "decimals" else None,
              "file": args.file, "controls": args.controls}
    bar = _progress_bar(len(items) * len(conditions))
    result = run_experiment(lm, items, conditions, quantiles, prefix, not args.no_greedy, args.max_new_tokens,
                            args.batch_size, config, progress=bar)
    bar.close()
    summary = analyze(result, seed=args.seed)
    if args.per_item:
        summary["items"] = [{"prompt": it.prompt, "correct": it.correct, "wrong": it.wrong} for it in items]
        for row, sc in zip(summary["conditions"], result.scores):
            row["per_item"] = {"forced_choice": sc.fc_correct.astype(int).tolist(),
                               "margin": [round(float(m), 4) for m in sc.margin],
                               "greedy": sc.greedy, "greedy_verdict": sc.greedy_verdict}
    table = to_markdown(summary)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, default=_jsonable))
    else:
        print(table)
    sys.stdout.flush()
    return 0


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x).__name__)


class _progress_bar:
    """tqdm on stderr, advanced per scored prompt; the description names the condition."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="prompt", dynamic_ncols=True, leave=False)
        self.last: dict[str, int] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        self.bar.set_description(name[:40])
        self.bar.update(done - self.last.get(name, 0))
        self.last[name] = done

    def close(self) -> None:
        self.bar.close()
