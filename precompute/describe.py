"""The offline explainer: a description per (neuron, polarity) from exemplars and weights.

No language model is involved. Each description is assembled from three measurements:

1. **Activating tokens**: over the neuron's train exemplars, the tokens where it is at
   or above half of that sequence's extreme (signed by polarity), counted and ranked.
2. **Context**: the corpus source most of those exemplars come from (its share must be
   ≥ 50%, else "mixed text"), plus the words around the activating tokens that are most
   over-represented relative to the whole corpus (count × idf).
3. **Output weights**: the tokens the neuron's output column promotes and suppresses
   through the unembedding, ``W_U · (g ⊙ W_down[:, n])`` with ``g`` the final RMSNorm
   weight (the "logit lens" of the neuron; signs swap for polarity −1).

Example: "Fires on ':', ' 3' in Bible verses (book chapter:verse references); context:
lord, israel, said; promotes ' Lord', ' God'; suppresses ' the'."
The summary keeps the tokens, a short topic and two context words in under 15 words;
it is what gets embedded for semantic search (3× faster to embed than the full text on
a CPU, and the output-token part adds little to a concept search).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import torch

EXPLAINER_ID = "offline-v1"

SHORT_TOPICS = {
    "bible": "Bible verses",
    "dates": "dates",
    "changelogs": "version numbers",
    "versions": "version numbers",
    "decimals": "decimal numbers",
    "code": "code",
    "prose": "prose",
    "chat": "chat",
}

TOPICS = {
    "bible": "Bible verses (book chapter:verse references)",
    "dates": "calendar dates",
    "changelogs": "software version numbers and changelogs",
    "versions": "software version numbers and changelogs",
    "decimals": "decimal numbers and arithmetic",
    "code": "Python source code",
    "prose": "English reference prose",
    "chat": "chat conversations",
}

STOPWORDS = set(
    "the and for that with this from are was were has have had not but you your all any can will would "
    "there their they them then than its it's into also been being which when what who whom how our out "
    "use used using may one two more most such each other only some his her him she he shall unto".split()
)
WORD = re.compile(r"[A-Za-z][A-Za-z']{2,}")


def topic_of(source: str, short: bool = False) -> str:
    table = SHORT_TOPICS if short else TOPICS
    return table.get(source, source.replace("_", " "))


WORDLIKE = re.compile(r"^ ?[A-Za-z][a-z]{2,}$")


def readable(tokens: list[str], n: int = 3) -> list[str]:
    """The first ``n`` whole-word-looking tokens (' Lord', 'said'), else the first ``n``.

    The logit lens of a neuron ranks many sub-word fragments ('rogen', 'ijuana') high; a
    description reads better, and searches better, with the word-like ones."""
    words = [t for t in tokens if WORDLIKE.match(t)]
    return (words + [t for t in tokens if t not in words])[:n]


def show(token: str) -> str:
    """A token as the description shows it: in single quotes, newlines as \\n."""
    return "'" + token.replace("\n", "\\n").replace("'", "’") + "'"


class OutputTokens:
    """Per layer, the tokens each neuron's output column promotes/suppresses most."""

    def __init__(self, lm, n: int = 20):
        self.lm, self.n = lm, n
        self.w_u = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, hidden]
        norm = getattr(lm.model.model, "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            self.w_u = self.w_u * norm.weight.detach().float()[None, :]

    def layer(self, layer: int) -> tuple[list[list[str]], list[list[str]]]:
        """(promotes, suppresses) per neuron of ``layer`` for polarity +1, ``n`` tokens each."""
        w_out = self.lm.layers[layer].mlp.down_proj.weight.detach().float().to(self.w_u.device)  # [hidden, neurons]
        logits = self.w_u @ w_out  # [vocab, neurons]
        top = torch.topk(logits, self.n, dim=0).indices.T.tolist()  # [neurons, n]
        bottom = torch.topk(-logits, self.n, dim=0).indices.T.tolist()
        dec = self.lm.tokenizer.decode
        cache: dict[int, str] = {}

        def tok(i: int) -> str:
            if i not in cache:
                cache[i] = dec([i])
            return cache[i]

        return [[tok(i) for i in row] for row in top], [[tok(i) for i in row] for row in bottom]


class ContextStats:
    """Document frequencies of words over corpus sequences, for idf weighting."""

    def __init__(self, texts: list[str]):
        self.n = len(texts)
        df: Counter = Counter()
        for t in texts:
            df.update({w.lower() for w in WORD.findall(t)})
        self.df = df

    def idf(self, word: str) -> float:
        return math.log((1 + self.n) / (1 + self.df.get(word, 0)))


def describe(
    polarity: int,
    exemplar_tokens: list[list[str]],
    exemplar_acts: np.ndarray,
    exemplar_sources: list[str],
    promotes: list[str],
    suppresses: list[str],
    ctx: ContextStats,
    window: int = 6,
) -> tuple[str, str, list[str], list[str]]:
    """One description from the train exemplars of one (neuron, polarity).

    ``exemplar_acts`` is ``[n, T]`` (raw activations); values are multiplied by
    ``polarity`` so "activating" means "extreme in this polarity". Returns
    ``(text, summary, activating_tokens, context_words)``.
    """
    signed = exemplar_acts * polarity  # [n, T]
    tok_count: Counter = Counter()
    words: Counter = Counter()
    for toks, row in zip(exemplar_tokens, signed):
        peak = float(row.max())
        if not peak > 0:
            continue
        hot = np.nonzero(row >= 0.5 * peak)[0]
        for i in hot[:8]:
            tok_count[toks[i]] += 1
        top = int(row.argmax())
        around = "".join(toks[max(0, top - window) : top + window + 1])
        words.update({w.lower() for w in WORD.findall(around)} - STOPWORDS)
    tokens = [t for t, _ in tok_count.most_common(3)]
    ranked = sorted(words, key=lambda w: (-words[w] * ctx.idf(w), w))
    context = [w for w in ranked if words[w] >= 2][:4]
    src = Counter(exemplar_sources)
    main, count = src.most_common(1)[0] if src else ("", 0)
    if exemplar_sources and count / len(exemplar_sources) >= 0.5:
        where = topic_of(main)
    else:
        parts = [topic_of(s) for s, _ in src.most_common(2)]
        where = "mixed text" + (f", mostly {' and '.join(parts)}" if parts else "")
    verb = "Fires on" if polarity > 0 else "Goes most negative on"
    shown = ", ".join(show(t) for t in tokens) or "no clear token"
    if polarity < 0:
        promotes, suppresses = suppresses, promotes
    text = f"{verb} {shown} in {where}"
    if context:
        text += f"; context: {', '.join(context)}"
    text += (f"; promotes {', '.join(show(t) for t in readable(promotes))}"
             f"; suppresses {', '.join(show(t) for t in readable(suppresses))}.")
    if exemplar_sources and count / len(exemplar_sources) >= 0.5:
        short = topic_of(main, short=True)
    else:
        short = " and ".join(topic_of(s, short=True) for s, _ in src.most_common(2)) or "mixed text"
    summary = f"{shown} in {short}" + (f" ({', '.join(context[:2])})" if context else "")
    summary = " ".join(summary.split()[:14])
    return text, summary, tokens, context
