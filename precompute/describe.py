"""The offline explainers: a description per (neuron, polarity) from exemplars and weights.

No language model is involved. The default, **contrastive** explainer (``offline-v3``,
:func:`describe`) says what distinguishes a neuron's train exemplars from the corpus:

1. **Tokens by log-odds, not frequency.** Each train exemplar votes once per token that is
   at or above half of its peak (weight: that token's best fraction of the peak), so one
   repetitive exemplar cannot outvote the token that peaks in five. Tokens are ranked by
   the z-scored log-odds of that vote against the token's corpus frequency (Monroe et al.'s
   "informative Dirichlet" log-odds with a 0.5 prior): ``δ = log((k+a)/(K−k+a)) −
   log((C+a)/(N−C+a))``, ``z = δ / √(1/(k+a) + 1/(C+a))``.
2. **The token before the peak.** ``' was' after 'When'`` when one previous token precedes
   the top token in ≥ 60% of its exemplars and at least twice as often as in the corpus.
3. **A quoted snippet** around the peak of the strongest exemplar, e.g. ``“When[ was] the”``.
4. **Position**: "at the window start" when most exemplars peak on the first scored position
   (windows cut mid-text, so the model sees that token without its context).
5. **Source**, one weighted feature: "mostly in Bible verses (11/15)" only when one corpus
   source holds ≥ 50% of the exemplars and at least twice its corpus share.
6. **Context words** (idf-weighted words around the peaks, chat-template words left out) in
   some candidates.
7. **Diffuse**: when no token recurs in at least a quarter of the exemplars the description
   says so ("Fires on no single token (diffuse); also …") instead of forcing three tokens.
8. **Output side**, a separate last clause: ``Output: promotes …; suppresses …`` — the
   tokens the neuron's output column promotes and suppresses through the unembedding,
   ``W_U · (g ⊙ W_down[:, n])`` with ``g`` the final RMSNorm weight (signs swap for −1).

Several candidates (1–4 tokens, with or without the previous token; then "also" clauses
naming 2 or 4 weaker tokens at half weight; then context words) are simulated on the **train** windows (train top exemplars plus the train half of
the random sequences) with the token-match simulator (:mod:`precompute.simulate`), and the
best is kept. Held-out scores are computed later, by the scores stage, on windows no
candidate was chosen on.

The summary (what search and the embedding scorers embed) leads with the behaviour, then
says where it happens: ``[window start: ][diffuse: ]TOKENS in SOURCES (CONTEXT): “SNIPPET”``,
e.g. ``' father', ' bore' in Bible verses (david, son): “years old, and she bore him Seg”``.
SOURCES is the source of at least half the top windows (or the two commonest when they hold
three quarters; otherwise no "in" part), CONTEXT up to two context words, SNIPPET the quoted
snippet without its brackets. v2 summaries were the tokens and a
distinctive source only; their median held-out embedding AUC was 0.68 against the old
explainer's 0.71 on the 524k-token build, because whole-window embeddings reward the words of
the context, which v2 had dropped (``offline-v3`` puts them back after the behaviour, where
behaviour-first search ranking reads them only as a boost).

:func:`describe_v1` is the previous explainer (``offline-v1``: the three most frequent hot
tokens, counted up to 8 per exemplar, "in <dominant source>", context words and the logit
lens), kept as the benchmark's baseline.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .simulate import loose

EXPLAINER_V1_ID = "offline-v1"  # the previous explainer, kept as the benchmark's baseline

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

    def ids(self, layer: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(promoted, suppressed) token ids per neuron of ``layer`` for polarity +1: int32
        ``[neurons, n]`` each, most promoted (suppressed) first.

        The logits ``[vocab, neurons]`` are computed ``chunk`` neurons at a time (100 MB for the
        embedded model's vocabulary): a whole layer would be vocab × neurons floats at once
        (2.8 GB for 49,152 × 14,336, 7.3 GB at Llama-3.1-8B's 128,256 × 14,336), for the same result."""
        w_out = self.lm.layers[layer].mlp.down_proj.weight.detach().float().to(self.w_u.device)  # [hidden, neurons]
        top, bottom = [], []
        for a in range(0, w_out.shape[1], chunk):
            logits = self.w_u @ w_out[:, a : a + chunk]  # [vocab, chunk]
            top.append(torch.topk(logits, self.n, dim=0).indices.T.to(torch.int32))  # [chunk, n]
            bottom.append(torch.topk(logits, self.n, dim=0, largest=False).indices.T.to(torch.int32))
            del logits
        return torch.cat(top).numpy(), torch.cat(bottom).numpy()

    def layer(self, layer: int, chunk: int = 512) -> tuple[list[list[str]], list[list[str]]]:
        """(promotes, suppresses) per neuron of ``layer`` for polarity +1, ``n`` tokens each (:meth:`ids`, decoded)."""
        top, bottom = self.ids(layer, chunk)
        return decode_rows(self.lm.tokenizer, top), decode_rows(self.lm.tokenizer, bottom)


def decode_rows(tokenizer, ids: np.ndarray) -> list[list[str]]:
    """Each row of token ids as its tokens' strings (one decode per distinct id)."""
    cache: dict[int, str] = {}

    def tok(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    return [[tok(int(i)) for i in row] for row in ids]


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


EXPLAINER_ID = "offline-v3"
INACTIVE = "Never active in this polarity on the corpus."
INACTIVE_SUMMARY = "never active"
PRIOR = 0.5  # the log-odds' Dirichlet prior per token
HOT = 0.5  # a position is "hot" at ≥ this fraction of its exemplar's peak
# Words of the chat template and its default system prompt: context words they are not.
CHAT_WORDS = {"im_start", "im_end", "assistant", "user", "system", "smollm", "helpful", "named", "trained",
              "hugging", "face", "start", "end", "you", "are"}


class CorpusStats:
    """What the contrastive explainer compares exemplars against: token and bigram counts over
    every scored corpus position, each source's share, word document frequencies."""

    def __init__(self, corpus, skip_prefix: int = 1):
        ids = np.asarray(corpus.token_ids, dtype=np.int64)
        body = ids[:, skip_prefix:]
        self.vocab = int(ids.max()) + 1 if ids.size else 1
        self.counts = np.bincount(body.ravel(), minlength=self.vocab).astype(np.float64)  # [V]
        self.n = float(body.size)
        s = max(skip_prefix, 1)
        pairs = (ids[:, s - 1:-1] * self.vocab + ids[:, s:]).ravel()  # (previous, current) codes
        keys, cnt = np.unique(pairs, return_counts=True)
        self.bigrams = dict(zip(keys.tolist(), cnt.tolist()))
        src = Counter(corpus.sources)
        self.source_share = {s: c / max(len(corpus), 1) for s, c in src.items()}
        self.ctx = ContextStats(corpus.texts)
        self.strings: dict[int, str] = {}
        for row_ids, row_toks in zip(ids, corpus.tokens):
            for i, t in zip(row_ids.tolist(), row_toks):
                self.strings.setdefault(i, t)

    def bigram_share(self, prev: int, tok: int) -> float:
        """P(prev before tok) in the corpus."""
        c = self.counts[tok] if tok < self.vocab else 0.0
        return self.bigrams.get(prev * self.vocab + tok, 0) / c if c else 0.0


@dataclass
class Evidence:
    """The measurements one description is assembled from (see the module docstring)."""

    n: int                                   # exemplars active in this polarity
    tokens: list[tuple[int, float, int]]     # (token id, z, support), best first
    after: dict[int, tuple[int, int]]        # token id → (previous token id, exemplars)
    start: int                               # exemplars peaking on the first scored position
    source: tuple[str, int] | None           # distinctive source and its exemplar count
    context: list[str]
    snippet: str
    sources: str = ""                        # where the top windows come from, for the summary


def evidence(polarity: int, windows, stats: CorpusStats, window: int = 6) -> Evidence | None:
    """The contrastive evidence of one (neuron, polarity) from its train top exemplars; None if never active."""
    n_top = windows.n_top
    signed = polarity * windows.acts[:n_top]  # [n, T']
    ids = windows.token_ids[:n_top]
    if not n_top or signed.shape[1] == 0:
        return None
    peaks = signed.max(axis=1)
    live = np.flatnonzero(peaks > 0)
    if not len(live):
        return None
    votes: dict[int, float] = {}
    support: Counter = Counter()
    where: dict[int, list[tuple[int, int]]] = {}  # token → (exemplar, its best position)
    words: Counter = Counter()
    start = 0
    for e in live.tolist():
        frac = signed[e] / peaks[e]
        hot = np.flatnonzero(frac >= HOT)
        best: dict[int, tuple[float, int]] = {}
        for p in hot.tolist():
            t = int(ids[e, p])
            if t not in best or frac[p] > best[t][0]:
                best[t] = (float(frac[p]), p)
        for t, (w, p) in best.items():
            votes[t] = votes.get(t, 0.0) + w
            support[t] += 1
            where.setdefault(t, []).append((e, p))
        top = int(np.argmax(signed[e]))
        start += top == 0
        toks = windows.tokens[e]
        around = "".join(toks[max(0, top - window): top + window + 1])
        words.update({w.lower() for w in WORD.findall(around)} - STOPWORDS - CHAT_WORDS)
    cand = np.fromiter(votes.keys(), np.int64)
    k = np.fromiter(votes.values(), np.float64)
    c = stats.counts[np.minimum(cand, stats.vocab - 1)] * (cand < stats.vocab)
    big_k, n = k.sum(), stats.n
    delta = np.log((k + PRIOR) / (big_k - k + PRIOR)) - np.log((c + PRIOR) / (n - c + PRIOR))
    z = delta / np.sqrt(1.0 / (k + PRIOR) + 1.0 / (c + PRIOR))
    order = np.argsort(-z, kind="stable")
    ranked = [(int(cand[i]), float(z[i]), int(support[int(cand[i])])) for i in order[:24]]
    if len(live) >= 4:  # tokens that recur first: one exemplar is an anecdote
        ranked = [r for r in ranked if r[2] >= 2] + [r for r in ranked if r[2] < 2]
    ranked = ranked[:8]
    after: dict[int, tuple[int, int]] = {}
    for t, _, sup in ranked[:3]:
        prevs = Counter(int(ids[e, p - 1]) for e, p in where[t] if p >= 1)
        if prevs:
            prev, cnt = prevs.most_common(1)[0]
            share = cnt / len(where[t])
            if cnt >= 2 and share >= 0.6 and share >= 2 * stats.bigram_share(prev, t):
                after[t] = (prev, cnt)
    src = Counter(windows.sources[e] for e in live.tolist())
    source, sources = None, ""
    if src:
        s, cnt = src.most_common(1)[0]
        if cnt / len(live) >= 0.5 and cnt / len(live) >= 2 * stats.source_share.get(s, 0.0):
            source = (s, cnt)
        two = src.most_common(2)
        if cnt / len(live) >= 0.5:  # where most top windows come from (distinctive or not)
            sources = topic_of(s, short=True)
        elif sum(c for _, c in two) / len(live) >= 0.75:  # or the two sources that hold three quarters
            sources = " and ".join(topic_of(x, short=True) for x, _ in two)
    context = sorted((w for w, c in words.items() if c >= 2), key=lambda w: (-words[w] * stats.ctx.idf(w), w))[:3]
    e0 = int(live[np.argmax(peaks[live])])
    p0 = int(np.argmax(signed[e0]))
    toks = windows.tokens[e0]
    snip = "".join(toks[max(0, p0 - 5): p0]) + "[" + toks[p0] + "]" + "".join(toks[p0 + 1: p0 + 3])
    snip = snip.replace("\n", "⏎").replace(";", ",").replace("'", "’").replace('"', "”")
    return Evidence(len(live), ranked, after, start, source, context, f"“{snip.strip()}”", sources)


def _token_list(ev: Evidence, strings: dict[int, str], m: int, with_after: bool, skip: int = 0) -> str:
    """Evidence tokens ``skip … m−1``, quoted, each with its previous token where ``with_after``."""
    parts = []
    for t, _, _ in ev.tokens[skip:m]:
        s = show(strings.get(t, "?"))
        if with_after and t in ev.after:
            s += f" after {show(strings.get(ev.after[t][0], '?'))}"
        parts.append(s)
    return ", ".join(parts)


SUMMARY_TOKENS = 2  # tokens a summary names


def _candidate(polarity: int, ev: Evidence, stats: CorpusStats, m: int, with_after: bool, ctx: bool,
               out_clause: str, also: int = 0) -> tuple[str, str]:
    verb = "Fires on" if polarity > 0 else "Goes most negative on"
    named = _token_list(ev, stats.strings, m, with_after)
    recurring = ev.tokens[0][2] >= max(2, 0.25 * ev.n)
    head = (f"{verb} {named} ({ev.tokens[0][2]}/{ev.n} top windows)" if recurring
            else f"{verb} no single token (diffuse); also {named}")
    clauses = [head]
    if also and recurring:  # weaker tokens, at half weight for a simulator
        clauses.append(f"also {_token_list(ev, stats.strings, m + also, with_after, skip=m)}")
    if ctx:
        clauses.append(f"context: {', '.join(ev.context)}")
    if ev.source:
        clauses.append(f"mostly in {topic_of(ev.source[0], short=True)} ({ev.source[1]}/{ev.n})")
    start = ev.start >= max(2, 0.5 * ev.n)
    if start:
        clauses.append(f"at the window start ({ev.start}/{ev.n})")
    clauses.append(f"e.g. {ev.snippet}")
    return "; ".join(clauses) + "." + out_clause, summary_of(ev, stats, min(m, SUMMARY_TOKENS), with_after, recurring, start)


SUMMARY_CONTEXT = 2  # context words a summary names
SNIPPET_WORDS = 8  # words of the snippet a summary quotes (a summary stays under 30 words)


def summary_of(ev: Evidence, stats: CorpusStats, m: int, with_after: bool, recurring: bool, start: bool) -> str:
    """The summary, what search and the embedding scorers embed (parsed back by
    :func:`cache.search_explain.split_summary`): the behaviour first (the tokens), then where it happens: the top windows' sources, context
    words and the quoted snippet (without its peak brackets)."""
    out = ("window start: " if start else "") + ("" if recurring else "diffuse: ") \
        + _token_list(ev, stats.strings, m, with_after)
    if ev.sources:
        out += f" in {ev.sources}"
    if ev.context[:SUMMARY_CONTEXT]:
        out += f" ({', '.join(ev.context[:SUMMARY_CONTEXT])})"
    snip = ev.snippet.replace("[", "").replace("]", "").strip("“”").split()[: min(SNIPPET_WORDS, 28 - len(out.split()))]
    return f"{out}: “{' '.join(snip)}”" if snip else out


MAX_TOKENS = 4
ALSO = (2, 4)  # how many weaker tokens an "also" clause may add to the best candidate


def describe(polarity: int, train, stats: CorpusStats, simulator, promotes: list[str],
             suppresses: list[str]) -> tuple[str, str, float | None]:
    """The best candidate by train simulation score: ``(text, summary, train score)``.

    ``train`` is :meth:`ExemplarView.train` with ``with_random=True`` (the explainer reads
    its train top exemplars; candidates are compared on those plus the train random
    sequences); ``simulator`` a :class:`~precompute.simulate.Simulator`. Candidates name
    the 1…4 best tokens, with and without their previous tokens; context words are then
    tried on the best of those. Ties go to the simpler candidate."""
    ev = evidence(polarity, train, stats)
    if ev is None:
        return INACTIVE, INACTIVE_SUMMARY, None
    if polarity < 0:
        promotes, suppresses = suppresses, promotes
    out_clause = (f" Output: promotes {', '.join(show(t) for t in readable(promotes))}; "
                  f"suppresses {', '.join(show(t) for t in readable(suppresses))}." if promotes or suppresses else "")
    named = {loose(stats.strings.get(t, "")) for t, _, _ in ev.tokens[:MAX_TOKENS]}
    ev.context = [w for w in ev.context if w not in named]  # a named token is not its own context
    variants: list[tuple[int, bool, bool, int]] = []  # (tokens named, with previous tokens, context, also)
    cands: list[tuple[str, str]] = []
    scores: list[float | None] = []

    def add(new: list[tuple[int, bool, bool, int]]) -> int:
        """Simulate these candidates on the train windows; the index of the best so far."""
        variants.extend(new)
        cands.extend(_candidate(polarity, ev, stats, m, after, ctx, out_clause, also) for m, after, ctx, also in new)
        scores.extend(simulator.scores([c[0] for c in cands[-len(new):]], polarity, train))
        return _best(scores)

    best = add([(m, after, False, 0) for m in range(1, min(MAX_TOKENS, len(ev.tokens)) + 1)
                for after in (True, False) if not after or any(t in ev.after for t, _, _ in ev.tokens[:m])])
    m, after, _, _ = variants[best]
    extra = [(m, after, False, a) for a in ALSO if m + a <= len(ev.tokens)]  # weaker tokens after the best ones
    if extra:
        best = add(extra)
    if ev.context:
        m, after, _, also = variants[best]
        best = add([(m, after, True, also)])
    return cands[best][0], cands[best][1], scores[best]


def _best(scores: list[float | None]) -> int:
    """The index of the highest score (None lowest; the earliest of equal ones)."""
    return max(range(len(scores)), key=lambda i: (-math.inf if scores[i] is None else scores[i], -i))


def describe_v1(
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
