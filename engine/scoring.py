"""Batched scoring of forced-choice items under steering: forced choice and greedy replies.

Provides:

* :func:`prepare` → :class:`Prepared`: items rendered and tokenised once, grouped by length;
* :func:`score` → :class:`Scores`: per item, whether the correct answer wins the forced
  choice, the log-probability margin, and the greedy reply with its verdict (:func:`judge`).

Scores per prompt, after an assistant reply stem (``prefix``, "The bigger number is "):

* **forced choice**: correct iff ``log p(correct | prompt, prefix) > log p(wrong | …)``,
  each the sum of its tokens' log-probabilities;
* **greedy**: greedy decoding (at most ``max_new_tokens``) from the same stem; correct iff
  the first number in the reply equals the correct answer (or, for non-numeric answers,
  the correct text appears before the wrong one).

Speed: prompts are grouped by rendered length (same length and last-user span ⇒ the
same position mask, so one compiled intervention set and no padding). The tokens every
prompt shares (system prompt, template, "Which is bigger: ") run once per group into a
KV cache; per batch one forward over the rest of prompt + stem extends a copy of it and
serves both scores: the candidates' tokens run on a copy repeated ×2, greedy decoding
continues on the original. Measured: ``python -m benchmarks.steering --experiment``.
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

DEFAULT_MAX_NEW_TOKENS = 8
DEFAULT_BATCH = 32
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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

