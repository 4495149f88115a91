"""Scoring answers under steering: complete-answer forced choice, the first differing token, greedy replies.

Provides:

* :func:`prepare` → :class:`Prepared`: items rendered and tokenised once, grouped by length;
* :func:`score` → :class:`Scores`: for every item and candidate answer, three log-probabilities
  (below), and the greedy reply with its verdict (:func:`judge`); :func:`score_many` does the
  same for many steering conditions in shared forward passes;
* :func:`answer_logprobs`: the same complete-answer scores for any number of candidates of one
  chat (the steering page's answer table uses it);
* :func:`boundary_masks`: which vocabulary tokens end an answer.

**Definitions.** After the prompt ``x`` and the reply stem ``s`` ("The bigger number is "), a
candidate ``c`` is tokenised together with the stem (as the model would see it) into
``c_1 … c_m``. With ``p`` the model's next-token distribution:

* **complete answer** (the default forced choice; length-neutral)::

      L(c) = Σ_i log p(c_i | x, s, c_<i)  +  log Σ_{t ∈ B(c)} p(t | x, s, c)

  where ``B(c)``, the *boundary*, is every token that ends the answer instead of extending it:
  for a number, every token whose text does not start with a digit 0–9 (nor with ``.`` when the
  number has no decimal point yet); for text, every token whose text does not start with a
  letter or digit (special tokens such as the end of turn count as boundaries). ``L(c)`` is the
  log-probability that the answer the model writes is exactly ``c``: a candidate is not charged
  for having more tokens, and a prefix ("9.2" against "9.25") does not collect the probability
  of its continuations, so both directions of a prefix pair are scored correctly.
* **first differing token**: at the first position ``j`` where the two candidates' tokens differ,
  ``F(c) = log p(c_j | …)``, or ``log Σ_{t∈B(c)} p(t | …)`` when ``c`` has already ended
  there. This is what a one-token probe reads; it ignores everything after ``j``.
* **token sum** (kept only to show the old bias): ``Σ_i log p(c_i | …)`` with no boundary. It
  charges every extra token and credits a prefix with its continuations.

Forced choice is correct when the correct candidate's score is higher; a tie (``|Δ| ≤``
:data:`TIE_EPS` nats) counts ½. **Greedy**: the reply decoded greedily after the stem; correct
when its first number equals the correct answer (text answers: the correct text comes first).

**Speed.** Items are grouped by rendered length and last-user span (one compiled intervention
set, no padding in the prompt). The tokens every prompt shares (system prompt, template, the
question's first words) run once per group into a KV cache; per batch one forward over the rest
of prompt + stem extends a copy of it; the candidates (all ``k`` per item, right-padded:
causal attention keeps padding from touching real tokens) run on a copy repeated ×k, and
greedy decoding continues on the original. :func:`score_many` stacks conditions into the same
forwards (one item under many steerings), so small groups still make full batches. Measured: ``python -m benchmarks.steering --experiment``.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import MonitorError
from .prompt_sets import DECIMALS_PREFIX, Item

DEFAULT_MAX_NEW_TOKENS = 12
DEFAULT_BATCH = 128  # rows per forward (items × stacked conditions): 1.5× the throughput of one condition at a time here
TIE_EPS = 1e-4  # nats: |L(correct) − L(wrong)| at or below this is a tie (½ correct)
METRICS = ("complete", "first_diff", "token_sum")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_DIGIT = re.compile(r"[0-9]")


def is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)?", str(text).strip()))


def judge(reply: str, correct: str, wrong: str) -> str:
    """``"correct"``, ``"wrong"`` or ``"other"`` for a greedy reply.

    Numeric answers: the first number in the reply decides (compared as numbers).
    Otherwise: whichever answer text occurs first (case-insensitive).
    """
    if is_number(correct) and is_number(wrong):
        m = _NUMBER.search(reply)
        if not m:
            return "other"
        v = float(m.group(0))
        return "correct" if v == float(correct) else "wrong" if v == float(wrong) else "other"
    low = reply.lower()
    ic, iw = low.find(correct.lower()), low.find(wrong.lower())
    if ic < 0 and iw < 0:
        return "other"
    if iw < 0 or (0 <= ic < iw) or (ic == iw and len(correct) > len(wrong)):
        return "correct"
    return "wrong"


# --------------------------------------------------------------------------- boundaries
@dataclass
class BoundaryMasks:
    """[vocab] bool masks of tokens that END an answer of each kind (see the module docstring)."""

    number_with_point: "object"  # torch.BoolTensor [V]
    number_without_point: "object"
    text: "object"

    def for_candidate(self, text: str):
        if is_number(text):
            return self.number_with_point if "." in text else self.number_without_point
        return self.text


_MASKS: dict[int, BoundaryMasks] = {}


def boundary_masks(lm) -> BoundaryMasks:
    """The boundary masks of ``lm``'s vocabulary (decoded once per tokenizer, then cached)."""
    import torch

    key = id(lm.tokenizer)
    if key not in _MASKS:
        tok = lm.tokenizer
        vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        texts = [tok.decode([i]) if i < len(tok) else "" for i in range(vocab)]
        digit = torch.tensor([bool(_DIGIT.match(t)) for t in texts])
        dot = torch.tensor([t.startswith(".") for t in texts])
        alnum = torch.tensor([bool(t[:1]) and t[:1].isalnum() for t in texts])
        dev = lm.device
        _MASKS[key] = BoundaryMasks((~digit).to(dev), (~digit & ~dot).to(dev), (~alnum).to(dev))
    return _MASKS[key]


def answer_terms(logits, tokens: Sequence[int], boundary):
    """The terms of ``L(c)`` as a tensor ``[m + 1]``: ``log p(c_1), …, log p(c_m)`` and
    ``log Σ_{t ∈ B(c)} p(t | …, c)``.

    ``logits`` ``[m + 1, V]``: row ``i`` is the prediction after the stem and ``c_1 … c_i`` (row 0:
    after the stem, row ``m``: after the whole candidate); ``boundary`` ``[V]`` bool is ``B(c)``
    (:func:`boundary_masks`). Differentiable: the scorer and answer-level attribution both use it.
    """
    import torch

    lse = torch.logsumexp(logits, dim=-1)  # [m + 1]
    m = len(tokens)
    idx = torch.tensor(list(tokens), device=logits.device)
    tok = logits[torch.arange(m, device=logits.device), idx] - lse[:m]
    bound = torch.logsumexp(logits[m][boundary], dim=0) - lse[m]
    return torch.cat([tok, bound[None]])


# --------------------------------------------------------------------------- preparing
@dataclass
class _Row:
    index: int
    ids: list[int]  # prompt + the stem tokens shared with every candidate
    span: tuple[int, int]  # the steered "last user" span
    cands: list[list[int]]  # each candidate's tokens after the shared stem (correct first)
    texts: list[str]  # the candidates' texts
    numeric: bool


@dataclass
class Prepared:
    """Items rendered and tokenised once, grouped by (prompt length, last-user span)."""

    items: list[Item]
    rows: list[_Row]
    groups: dict[tuple, list[int]]  # key -> row indices
    tail: list[int]  # stem tokens not shared with the candidates (fed before greedy decoding)
    rendered: dict[tuple, object]  # key -> a RenderedChat of that group (for compiling interventions)
    prefix: str
    common: int = 0  # leading tokens every row shares (system prompt, template): computed once per group

    @property
    def n_candidates(self) -> int:
        return len(self.rows[0].cands)


def prepare(lm, items: Sequence[Item], prefix: str = DECIMALS_PREFIX,
            candidates: Sequence[Sequence[str]] | None = None) -> Prepared:
    """Render every item's chat and tokenise its candidates after the stem ``prefix``.

    Candidates are ``(correct, wrong)`` per item, or ``candidates[i]`` when given (any number,
    the same for every item). Each is tokenised together with the stem; the longest prefix of
    the stem's tokens that every candidate shares runs with the prompt, the rest belongs to
    the candidates.
    """
    from .chat import render_chat

    tok = lm.tokenizer
    if not items:
        raise MonitorError("No prompts to score.")
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    texts = [list(candidates[i]) if candidates is not None else [it.correct, it.wrong] for i, it in enumerate(items)]
    if len({len(t) for t in texts}) != 1 or len(texts[0]) < 1:
        raise MonitorError("Every item needs the same number (at least one) of answer candidates.")
    fulls = []
    for cands in texts:
        toks = []
        for cand in cands:
            if not str(cand).strip():
                raise MonitorError("An answer candidate is empty: give non-empty answers.")
            ids = tok(prefix + cand, add_special_tokens=False)["input_ids"]
            if len(ids) <= len(pre) and ids[: len(ids)] == pre[: len(ids)]:
                raise MonitorError(f"The answer {cand!r} tokenises to nothing after the stem {prefix!r}.")
            toks.append(ids)
        fulls.append(toks)
    shared = len(pre)
    for toks in fulls:
        for ids in toks:
            j = 0
            while j < min(shared, len(ids) - 1) and ids[j] == pre[j]:
                j += 1
            shared = j
    rows, groups, rendered = [], {}, {}
    for i, (it, toks, cands) in enumerate(zip(items, fulls, texts)):
        r = render_chat(tok, it.chat(), add_generation_prompt=True, max_tokens=lm.max_context)
        span = r.last_turn("user") if r.messages else (0, len(r))
        ids = r.input_ids.tolist() + pre[:shared]
        if len(ids) + max(len(t) - shared for t in toks) + 1 > lm.max_context:
            raise MonitorError(f"Prompt {i} with its stem and answers is longer than the model's context "
                               f"({lm.max_context} tokens); shorten it.")
        key = (len(r), span)
        rows.append(_Row(i, ids, span, [t[shared:] for t in toks], list(cands), all(is_number(c) for c in cands)))
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


# --------------------------------------------------------------------------- scores
@dataclass
class Scores:
    """Per-item results of one condition (candidate 0 is the correct answer, 1 the wrong one)."""

    complete: np.ndarray  # [n, k] L(c): log p(the answer is exactly c)
    first_diff: np.ndarray  # [n, k] F(c): log p at the first differing token (k = 2 only; else NaN)
    token_sum: np.ndarray  # [n, k] Σ token log-probs, no boundary (length-biased; for comparison)
    greedy: list[str]  # replies ("" when greedy is off)
    greedy_verdict: list[str]  # correct / wrong / other ("other" when greedy is off)
    seconds: float

    def margin_of(self, metric: str = "complete") -> np.ndarray:
        """[n] score(correct) − score(wrong) under ``metric`` (one of :data:`METRICS`)."""
        s = getattr(self, metric)
        return s[:, 0] - s[:, 1]

    @property
    def margin(self) -> np.ndarray:
        return self.margin_of("complete")

    def correct_of(self, metric: str = "complete") -> np.ndarray:
        """[n] 1 correct, 0 wrong, ½ tie (|margin| ≤ TIE_EPS) under ``metric``."""
        m = self.margin_of(metric)
        return np.where(np.abs(m) <= TIE_EPS, 0.5, (m > 0).astype(np.float64))

    @property
    def fc_correct(self) -> np.ndarray:
        return self.correct_of("complete")

    @property
    def greedy_correct(self) -> np.ndarray:
        return np.array([v == "correct" for v in self.greedy_verdict], np.float64)

    @property
    def greedy_valid(self) -> np.ndarray:
        return np.array([v != "other" for v in self.greedy_verdict], bool)


@dataclass
class _BatchScores:
    """What one batch of :func:`score` computed, for rows ``index``."""

    index: list[int]
    complete: np.ndarray  # [S, B, k] (S stacked conditions)
    first_diff: np.ndarray  # [S, B, k]
    token_sum: np.ndarray  # [S, B, k]
    replies: list[list[str]]  # [S][B]
    verdicts: list[list[str]]


def score(lm, prep: Prepared, interventions=None, quantiles=None, greedy: bool = True,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH,
          progress: Callable[[int], None] | None = None) -> Scores:
    """Every prepared item's candidate scores (module docstring) and greedy reply under ``interventions``.

    Interventions see absolute positions (``NeuronHooks.offset``), so prompt ranges steer the
    prompt and ``+generated`` ranges the stem, the candidates and the reply, exactly as
    :func:`engine.generate.sequence_logprob` and :func:`engine.generate.generate` do.
    """
    return score_many(lm, prep, [interventions], quantiles, greedy, max_new_tokens, batch_size, progress)[0]


def score_many(lm, prep: Prepared, conditions: Sequence, quantiles=None, greedy: bool = True,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH,
               progress: Callable[[int], None] | None = None) -> list[Scores]:
    """:func:`score` for many steering conditions (each a list of interventions, or None) at once.

    The conditions of a chunk share every forward pass: their rows are stacked, condition by
    condition, and a :class:`~engine.steering.StackedInterventions` steers each block its own
    way, so a group of few same-length items still fills a batch of about ``batch_size`` rows
    (one item under many conditions). The results equal scoring each condition alone.
    ``progress(k)``: ``k`` more item-conditions scored. A condition's ``seconds`` is its share of
    the wall time.
    """
    import torch
    from transformers import DynamicCache

    from .hooks import NeuronHooks
    from .steering import StackedInterventions, compile_interventions

    t0 = time.perf_counter()
    C = len(conditions)
    n, k = len(prep.rows), prep.n_candidates
    out = [{name: np.full((n, k), np.nan) for name in METRICS} for _ in range(C)]
    replies = [[""] * n for _ in range(C)]
    verdicts = [["other"] * n for _ in range(C)]
    common = prep.common
    for key, members in prep.groups.items():
        batches = item_batches(members, batch_size)
        chunk = max(1, batch_size // len(batches[0]))  # conditions sharing a forward
        for c0 in range(0, C, chunk):
            cids = list(range(c0, min(C, c0 + chunk)))
            compiled = StackedInterventions([
                compile_interventions(conditions[c] or [], prep.rendered[key], lm.n_layers, lm.n_neurons, quantiles,
                                      device=lm.device, dtype=lm.dtype) for c in cids])
            S = len(cids)
            with lm.lock, torch.inference_mode(), NeuronHooks(lm, interventions=compiled) as hooks:
                head = None
                if common:
                    # The shared head (system prompt, template, start of the question) once per group
                    # and condition.
                    head = DynamicCache()
                    hooks.offset = 0
                    head_ids = torch.tensor([prep.rows[members[0]].ids[:common]] * S, dtype=torch.long,
                                            device=lm.device)
                    lm.model(input_ids=head_ids, cache=head, use_cache=True, logits_to_keep=1)
                for idx in batches:
                    batch = [prep.rows[i] for i in idx]
                    res = _score_batch(lm, hooks, head, common, batch, prep, greedy, max_new_tokens, S)
                    for j, c in enumerate(cids):
                        for name in METRICS:
                            out[c][name][res.index] = getattr(res, name)[j]
                        for i, reply, verdict in zip(res.index, res.replies[j], res.verdicts[j]):
                            replies[c][i], verdicts[c][i] = reply, verdict
                    if progress is not None:
                        progress(len(batch) * S)
    seconds = (time.perf_counter() - t0) / max(C, 1)
    return [Scores(o["complete"], o["first_diff"], o["token_sum"], r, v, seconds)
            for o, r, v in zip(out, replies, verdicts)]


def item_batches(members: list[int], batch_size: int) -> list[list[int]]:
    """A group's items (row indices) in the batches :func:`score_many` runs them in: at most
    ``batch_size`` items each, in order (the benchmark counts the suite's tokens by the same rule)."""
    per_batch = max(1, min(len(members), batch_size))
    return [members[start:start + per_batch] for start in range(0, len(members), per_batch)]


def _score_batch(lm, hooks, head, common: int, batch: list[_Row], prep: Prepared, greedy: bool,
                 max_new_tokens: int, S: int = 1) -> _BatchScores:
    """One batch of :func:`score_many`: rows of one group (the same rendered length) under ``S``
    stacked conditions (rows condition-major: condition 0's rows, then condition 1's, …).
    The returned arrays and lists have a leading condition axis."""
    import torch
    from transformers import DynamicCache

    device = lm.device
    B, k = len(batch), prep.n_candidates
    ids = torch.tensor([r.ids for r in batch] * S, dtype=torch.long, device=device)  # [S·B, T0]
    T0 = ids.shape[1]
    if head is not None:
        cache = copy.deepcopy(head)  # [S] rows, one per condition
        cache.batch_repeat_interleave(B)
    else:
        cache = DynamicCache()
    hooks.offset = common
    last = lm.model(input_ids=ids[:, common:], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    cands = [c for r in batch for c in r.cands] * S  # [S·B·k] token lists: condition, row, candidate
    longest = max(len(c) for c in cands)
    # Every candidate token is fed, so the logits after its last token give the boundary mass.
    cc = copy.deepcopy(cache) if greedy and max_new_tokens > 0 else cache
    cc.batch_repeat_interleave(k)
    inp = torch.tensor([c + [c[-1]] * (longest - len(c)) for c in cands], dtype=torch.long, device=device)
    hooks.offset = T0
    logits = lm.model(input_ids=inp, cache=cc, use_cache=True).logits.float()  # [S·B·k, M, V]
    del cc
    masks = boundary_masks(lm)
    complete = np.zeros((S, B, k))
    token_sum = np.zeros((S, B, k))
    first = np.full((S, B, k), np.nan)
    for s in range(S):
        for b, r in enumerate(batch):
            per_token = []  # per candidate: [log p(c_1), …, log p(c_m), log P(B(c))]
            sb = s * B + b
            for j, (c, text) in enumerate(zip(r.cands, r.texts)):
                row, m = sb * k + j, len(c)
                terms = answer_terms(torch.cat([last[sb:sb + 1].float(), logits[row, :m]]), c,
                                     masks.for_candidate(text))
                lp = terms.tolist()
                token_sum[s, b, j] = sum(lp[:-1])
                complete[s, b, j] = sum(lp)
                per_token.append(lp)
            if k == 2:
                c0, c1 = r.cands
                j = next((i for i, (x, y) in enumerate(zip(c0, c1)) if x != y), min(len(c0), len(c1)))
                first[s, b] = [per_token[0][j], per_token[1][j]]  # index len(c) is the boundary term
    replies = [[""] * B for _ in range(S)]
    verdicts = [["other"] * B for _ in range(S)]
    if greedy and max_new_tokens > 0:
        flat = _greedy(lm, hooks, cache, last, batch * S, prep.tail, T0, max_new_tokens)
        for s in range(S):
            replies[s] = flat[s * B:(s + 1) * B]
            verdicts[s] = [judge(text, r.texts[0], r.texts[1]) if len(r.texts) == 2 else "other"
                           for text, r in zip(replies[s], batch)]
    return _BatchScores([r.index for r in batch], complete, first, token_sum, replies, verdicts)


def _greedy(lm, hooks, cache, last, batch: list[_Row], tail: list[int], pos: int, max_new_tokens: int) -> list[str]:
    """Greedy replies continuing ``cache`` (prompt + shared stem) of a batch: until every reply holds
    a whole number (numeric answers), an end-of-sequence token, or ``max_new_tokens``."""
    import torch

    from .generate import eos_ids

    tok, device, stop = lm.tokenizer, lm.device, eos_ids(lm)
    B = len(batch)
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
        last = lm.model(input_ids=torch.tensor(nxt, device=device)[:, None], cache=cache, use_cache=True).logits[:, -1]
        pos += 1
    return [tok.decode([i for i in o if i not in stop], skip_special_tokens=True) for o in out]


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


def answer_logprobs(lm, chat, candidates: Sequence[str], interventions=None, quantiles=None,
                    prefix: str = "") -> np.ndarray:
    """[k] complete-answer log-probabilities ``L(c)`` (module docstring) of ``candidates`` after
    ``chat`` and the reply stem ``prefix``, under ``interventions``."""
    cands = [str(c).strip() for c in candidates]
    if not cands or any(not c for c in cands):
        raise MonitorError("Give at least one non-empty answer candidate.")
    item = Item.from_chat(chat, cands[0], cands[-1])
    prep = prepare(lm, [item], prefix, candidates=[cands])
    return score(lm, prep, interventions, quantiles, greedy=False).complete[0]
