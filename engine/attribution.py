"""What attribution differentiates: the scalar objective, computed from the model's hidden states.

An :class:`Objective` says which rows the model runs (the trace's tokens, possibly followed by
answer continuations) and how its scalar ``f`` is read from their final hidden states. The
attribution of neuron ``n`` of layer ``l`` at token ``t`` is ``A = a[l,t,n] · ∂f/∂a[l,t,n]``
(:func:`engine.trace.run_trace` takes one forward and one backward through the objective's rows).

* **single target** (:func:`token_objective`, no distractor): ``f = log p(x_τ | x_<τ)``.
* **contrastive** (:func:`token_objective` with a distractor ``d``, resolved by
  :func:`resolve_distractor`): ``f = log p(x_τ | x_<τ) − log p(d | x_<τ)``, both read at the
  logits of position ``τ − 1``, so ``A = A_target − A_distractor`` exactly (one backward).
* **answer level** (:func:`answer_objective`): after the prompt and a reply stem ``s`` the two
  answers ``c`` and ``c'`` are appended (two rows of one batch) and
  ``f = L(c) − L(c')`` with ``L`` the complete-answer log-probability of
  :mod:`engine.scoring` (token log-probs plus the boundary term, :func:`engine.scoring.answer_terms`:
  the experiment scorer's definition). A neuron on the shared prompt + stem feeds both rows, so its
  gradient is the sum of the two rows' gradients there.

:meth:`Objective.values` reads ``f`` for many groups of rows at once; :mod:`engine.effects` uses it
to measure what suppressing neurons actually does to the same quantity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import MonitorError


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class Objective:
    """The scalar attributed to. ``kind``: ``token``, ``contrast`` or ``answer``.

    ``continuations`` holds, per row, the tokens appended after the trace's tokens (one empty row
    for token objectives; the two answers for an answer objective). ``label`` is the formula in words.
    """

    kind: str
    label: str
    continuations: list[list[int]] = field(default_factory=lambda: [[]])
    target_index: int | None = None  # τ (token objectives)
    target_id: int | None = None
    distractor_id: int | None = None
    boundaries: list = field(default_factory=list)  # answer: per answer, its boundary mask [V] bool

    @property
    def n_rows(self) -> int:
        return len(self.continuations)

    def rows(self, ids: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """``[rows, tokens + M]``: ``ids`` [tokens] followed by each continuation, right-padded with
        ``pad`` (causal attention: padding after a row's real tokens never reaches them)."""
        longest = max(len(c) for c in self.continuations)
        base = ids.tolist()
        return torch.tensor([base + c + [pad] * (longest - len(c)) for c in self.continuations],
                            dtype=torch.long, device=ids.device)

    def values(self, hidden: torch.Tensor, head, n_tokens: int, offset: int = 0) -> torch.Tensor:
        """``f`` per group: ``hidden`` [groups × rows, tokens + M − offset, d] (rows of one group
        adjacent; position ``p`` of the rows sits at ``p − offset``, after a KV-cached prefix of
        ``offset`` tokens), ``head`` the LM head, ``n_tokens`` the trace's length → ``[groups]``."""
        if self.kind in ("token", "contrast"):
            logp = torch.log_softmax(_at_least_fp32(head(hidden[:, self.target_index - 1 - offset])), dim=-1)  # [G, V]
            f = logp[:, self.target_id]
            return f - logp[:, self.distractor_id] if self.distractor_id is not None else f
        from .scoring import answer_terms

        r = self.n_rows
        out = []
        for g in range(hidden.shape[0] // r):
            total = 0.0
            for j, (cand, bound) in enumerate(zip(self.continuations, self.boundaries)):
                m = len(cand)
                logits = _at_least_fp32(head(hidden[g * r + j, n_tokens - 1 - offset:n_tokens + m - offset]))  # [m + 1, V]
                total = total + (1.0 if j == 0 else -1.0) * answer_terms(logits, cand, bound).sum()
            out.append(total)
        return torch.stack(out)


def resolve_distractor(tokenizer, target_id: int, distractor) -> int:
    """The distractor's token id. ``distractor``: an ``int`` id, ``"id:N"``, or a token string; a string
    of several tokens uses its first token that differs from the target."""
    vocab = len(tokenizer)
    if isinstance(distractor, str) and re.fullmatch(r"id:\d+", distractor.strip()):
        distractor = int(distractor.strip()[3:])
    if isinstance(distractor, int):
        if not 0 <= distractor < vocab:
            raise MonitorError(f"Unknown distractor token id {distractor}: the vocabulary has ids 0..{vocab - 1}.")
        ids = [distractor]
    else:
        text = str(distractor)
        if not text:
            raise MonitorError("The distractor is empty: give a token string such as ' 8', or id:N.")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise MonitorError(f"Unknown distractor {text!r}: it tokenises to nothing.")
    for i in ids:
        if int(i) != int(target_id):
            return int(i)
    raise MonitorError(f"The distractor {tokenizer.decode([int(target_id)])!r} is the target token itself: "
                       "pick a different token to contrast with.")


def token_objective(tokenizer, ids: torch.Tensor, target_index: int, distractor=None) -> Objective:
    """The (contrastive) next-token objective at target position ``target_index`` (already checked
    to be in 1..n−1) of ``ids`` [tokens]; ``distractor`` as in :func:`resolve_distractor`."""
    tid = int(ids[target_index])
    target = tokenizer.decode([tid])
    if distractor is None:
        return Objective("token", f"log p({target!r})", target_index=target_index, target_id=tid)
    did = resolve_distractor(tokenizer, tid, distractor)
    return Objective("contrast", f"log p({target!r}) − log p({tokenizer.decode([did])!r})",
                     target_index=target_index, target_id=tid, distractor_id=did)


def answer_objective(lm, chat, answer: str, versus: str, stem: str = ""):
    """``(rendered, objective)`` for ``f = L(answer) − L(versus)`` after ``chat`` and the reply ``stem``.

    Tokenised exactly as the experiment scorer does (:func:`engine.scoring.prepare`: each answer
    together with the stem); ``rendered`` is the chat followed by the stem tokens the two answers
    share, the tokens whose neurons get an attribution.
    """
    from .chat import RenderedChat, render_chat
    from .prompt_sets import Item
    from .scoring import boundary_masks, prepare

    a, b = str(answer).strip(), str(versus).strip()
    if not a or not b:
        raise MonitorError("Both answers must be non-empty: give --answer TEXT and --versus TEXT.")
    if a == b:
        raise MonitorError(f"The two answers are the same ({a!r}): give two different answers to compare.")
    prep = prepare(lm, [Item.from_chat(chat, a, b)], stem, candidates=[[a, b]])
    row = prep.rows[0]
    base = render_chat(lm.tokenizer, chat, add_generation_prompt=True, max_tokens=lm.max_context)
    extra = row.ids[len(base):]
    tokens = [lm.tokenizer.decode([i]) for i in extra]
    offsets, text = list(base.offsets), base.text
    for t in tokens:
        offsets.append((len(text), len(text) + len(t)))
        text += t
    rendered = RenderedChat(text, torch.tensor(row.ids, dtype=torch.long), offsets, base.tokens + tokens,
                            base.messages, base.message_spans)
    masks = boundary_masks(lm)
    label = f"L({a!r}) − L({b!r})" + (f" after {stem!r}" if stem else "")
    return rendered, Objective("answer", label, continuations=[list(c) for c in row.cands],
                               boundaries=[masks.for_candidate(t) for t in row.texts])
