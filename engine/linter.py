"""The concept linter: group a trace's important neurons into concepts and flag the spurious ones.

Steps (the reference system's, plus our spurious flag):

1. **Important neurons** (:func:`important_neurons`): the top attribution cells of a trace,
   or the cells at or beyond each neuron's extreme quantile (normalised activation ≥ 1),
   merged per (layer, neuron, polarity), each with a weight and the tokens it fired on.
2. **Clusters** (:func:`cluster_embeddings`): their description embeddings, average
   linkage on cosine distance, cut at distance 0.6; clusters of at least 3 neurons.
3. **Labels**: offline, the cluster's c-TF-IDF keywords (:func:`ctfidf_keywords`) and its
   most central description; or any ``labeler`` with ``label(summaries) → (label,
   coherence)``, e.g. the optional LLM labeler (:class:`concepts.lint.LLMLabeler`).
4. **Rank** by summed weight: summed |attribution|, or summed normalised activation.
5. **Spurious flag** (:class:`RelevanceCalibration`): a cluster is unrelated when its centroid
   is less similar to the conversation than the 90th percentile of random database
   descriptions are (see :data:`SPURIOUS_RULE`).
6. **Causal check** (:func:`causal_check`, optional, needs the model): each cluster's cells are
   suppressed and the change of the trace's objective measured (:mod:`engine.effects`); the
   same for ≥ 20 random neuron sets matched in size, layers, tokens and activation mass
   (:func:`engine.controls.matched_controls`), and :func:`engine.stats.null_position` places
   the cluster's |effect| among theirs. A cluster **moves the answer** when its |effect| is
   above the null's median with one-sided ``p_empirical ≤ 0.05`` (with 20 controls: beyond
   all of them). With the check, *spurious* = unrelated **and** moves the answer, and the
   clusters are ranked by |measured effect|.

Calibrating the spurious flag. Raw cosine similarities between a conversation and a
description are small and depend on the conversation (all-MiniLM-L6-v2: a related concept
may score 0.2, an unrelated one 0.05), so a fixed cut would not transfer. The threshold is
therefore relative: per conversation, the similarity of 2,000 random database descriptions
to it gives a null distribution, and its 90th percentile is the cut. Measured on the
embedded model's test database for "Which is bigger: 9.8 or 9.11?" (cut ≈ 0.146): the
centroids of the top-30 "decimal numbers" and "version numbers" neurons sit at the 97th
and 99th percentiles (kept), "dates" at the 64th, "Bible verses" at the 49th and "Python
code" at the 38th (flagged); for a Genesis verse the "Bible verses" centroid is at the
99.7th percentile and for a Python snippet the "Python code" one at the 99.5th (kept).

The database side (embeddings, summaries, random descriptions) is looked up by
:func:`concepts.lint.lint_trace`; everything here works on arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .activation_view import ActivationView, normalise_layer, token_mask
from .specs import ConceptSpec
from .errors import MonitorError
from .steering import TokenRange

DEFAULT_THRESHOLD = 0.6
DEFAULT_MIN_SIZE = 3
DEFAULT_TOP_K = 1000
DEFAULT_PERCENTILE = 90.0
DEFAULT_NULL_SETS = 20
CAUSAL_ALPHA = 0.05
LINT_MODES = ("attribution", "activation")

SPURIOUS_RULE = (
    "A cluster is flagged as likely spurious when its meaning is not clearly related to the conversation. "
    "We embed the conversation's messages, average the cluster's description embeddings (its centroid) and take "
    "their cosine similarity. The same similarity is computed for {n} randomly drawn neuron descriptions from the "
    "database, and the threshold is their {pct:g}th percentile ({thr:.3f} for this conversation). A cluster below "
    "it is less related to the conversation than the {rest:g}% most related random neurons, so it probably fires "
    "for a surface reason (e.g. date neurons on the number 9.8) rather than because of what the conversation is "
    "about. The flag is a hint, not a verdict: check the cluster's tokens and exemplars."
)


# --------------------------------------------------------------------------- important neurons
@dataclass
class NeuronHit:
    """One (layer, neuron, polarity) that matters in a trace.

    ``weight``: summed |attribution| over its top cells, or its largest normalised
    activation. ``tokens``: token index → that cell's weight.
    """

    layer: int
    neuron: int
    polarity: int
    weight: float
    tokens: dict[int, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.layer, self.neuron, self.polarity)


def important_neurons(trace, mode: str = "attribution", k: int = DEFAULT_TOP_K, scale=None,
                      min_normalised: float = 1.0, skip_tokens: Sequence[int] = (0,)) -> list[NeuronHit]:
    """The neurons that matter in ``trace``, heaviest first.

    * ``attribution``: the top ``k`` (layer, token, neuron) cells by |attribution|
      (as the reference keeps); the polarity of a cell is the sign of its activation;
      cells merge per (layer, neuron, polarity) with ``weight = Σ |attribution|``.
    * ``activation``: ``scale`` is an :class:`~engine.activation_view.ActivationView` or
      the raw ``(Q(1−1e-5), Q(1e-5))`` tables it is built from; the normalised activation
      ``n`` is the chat table's (:mod:`engine.activation_view`: floored divisors, so ≥ 1
      means at or beyond the quantile). Each side of a neuron whose ``|n|`` reaches
      ``min_normalised`` counts as one hit (polarity +1 for ``n > 0``, −1 for ``n < 0``),
      ``weight`` its largest ``|n|``, top ``k`` kept. The (layer, neuron) pairs are therefore
      exactly the chat table's rows at that threshold. ``skip_tokens`` (the attention sink,
      token 0) are left out.
    """
    import torch

    if mode not in LINT_MODES:
        raise MonitorError(f"Unknown linter mode {mode!r}: use attribution or activation.")
    if int(k) < 1:
        raise MonitorError("The linter needs k of at least 1 neuron.")
    hits: dict[tuple[int, int, int], NeuronHit] = {}
    if mode == "attribution":
        if not trace.has_attribution:
            raise MonitorError("This trace has no attribution: pick a target token, or lint by activation.")
        top = [c for c in trace.top_cells("attributions", int(k), skip_tokens) if abs(c["value"]) > 0]
        acts = trace.cells("activations", *(np.array([c[f] for c in top], np.int64)
                                            for f in ("layer", "token_index", "neuron"))) if top else []
        for c, a in zip(top, acts):
            layer, tok, neuron, value = c["layer"], c["token_index"], c["neuron"], abs(c["value"])
            pol = 1 if float(a) >= 0 else -1
            h = hits.setdefault((layer, neuron, pol), NeuronHit(layer, neuron, pol, 0.0))
            h.weight += value
            h.tokens[tok] = h.tokens.get(tok, 0.0) + value
    else:
        if scale is None:
            raise MonitorError("Linting by activation needs the neurons' quantiles: open a neuron database.")
        view = scale if isinstance(scale, ActivationView) else ActivationView.from_quantiles(*scale)
        best = trace.sides(view, skip_tokens)  # [2, layers, neurons]: largest max(n, 0) and max(−n, 0)
        flat = best.reshape(-1)
        order = torch.argsort(flat, descending=True)[: int(k)]
        n_layers, n_neu = best.shape[1], best.shape[2]
        chosen = []
        for i in order.tolist():
            value = float(flat[i])
            if value < min_normalised or value <= 0:
                break
            side, rest = divmod(i, n_layers * n_neu)
            chosen.append((side, *divmod(rest, n_neu), value))
        rows = trace.neuron_rows("activations", {(layer, neuron) for _, layer, neuron, _ in chosen})
        keep = token_mask(trace.shape[1], skip_tokens)
        for side, layer, neuron, value in chosen:
            col = normalise_layer(rows[(layer, neuron)][:, None], (view.pos[:, [neuron]], view.neg[:, [neuron]]),
                                  layer)[:, 0].masked_fill(~keep, 0.0)
            col = col.clamp(min=0) if side == 0 else (-col).clamp(min=0)
            pol = 1 if side == 0 else -1
            toks = {int(t): float(col[t]) for t in torch.nonzero(col >= min_normalised).flatten().tolist()}
            hits[(layer, neuron, pol)] = NeuronHit(layer, neuron, pol, value, toks)
    return sorted(hits.values(), key=lambda h: (-h.weight, h.layer, h.neuron, -h.polarity))


# --------------------------------------------------------------------------- clustering
def cluster_embeddings(embeddings: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                       min_size: int = DEFAULT_MIN_SIZE) -> list[np.ndarray]:
    """Row groups of ``embeddings`` [m, d]: average-linkage clusters on cosine distance.

    ``d(u, v) = 1 − u·v / (‖u‖‖v‖)``; the tree (``scipy.cluster.hierarchy.linkage``,
    ``method="average"``) is cut where the average distance exceeds ``threshold``
    (``fcluster(criterion="distance")``: members of one cluster merge at ≤ threshold).
    Clusters smaller than ``min_size`` are dropped. Returns the row indices of each
    cluster (ascending), clusters ordered by their smallest row.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    if not 0 < float(threshold) <= 2:
        raise MonitorError(f"The cluster threshold is a cosine distance in (0, 2]; got {threshold}.")
    if int(min_size) < 1:
        raise MonitorError("The minimum cluster size must be at least 1.")
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < max(2, int(min_size)):
        return []
    labels = fcluster(linkage(x, method="average", metric="cosine"), t=float(threshold), criterion="distance")
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    groups = [g for g in groups if len(g) >= int(min_size)]
    return sorted(groups, key=lambda g: int(g[0]))


# --------------------------------------------------------------------------- labels
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def ctfidf_keywords(class_docs: Sequence[Sequence[str]], top_n: int = 3) -> list[list[str]]:
    """The ``top_n`` c-TF-IDF keywords of each class of documents.

    Each class's documents are joined into one. With ``tf[t, c]`` the count of term ``t``
    (English words of 2+ letters, and their bigrams, English stop words removed) in class
    ``c``, ``A`` the mean number of terms per class and ``f[t] = Σ_c tf[t, c]``:

        W[t, c] = tf[t, c] / Σ_t' tf[t', c] × log(1 + A / f[t])

    (BERTopic's class-based TF-IDF). Quoted token lists (``' by', ' In'``) are removed
    first: they name activating tokens, not topics. Bigrams never span two documents. On
    equal weight a bigram goes first, and a unigram inside a chosen bigram (or a bigram
    around a chosen unigram) is skipped.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    docs = [_QUOTED.sub(" ", str(d)) for ds in class_docs for d in ds if d]
    owner = np.array([c for c, ds in enumerate(class_docs) for d in ds if d], np.int64)  # [docs]
    if not any(d.strip() for d in docs):
        return [[] for _ in class_docs]
    vec = CountVectorizer(stop_words="english", ngram_range=(1, 2), token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")
    try:
        counts = vec.fit_transform(docs)  # [docs, terms]
    except ValueError:  # only stop words
        return [[] for _ in class_docs]
    tf = np.zeros((len(class_docs), counts.shape[1]))  # [classes, terms]
    np.add.at(tf, owner, counts.toarray())
    terms = vec.get_feature_names_out()
    per_class = tf.sum(axis=1, keepdims=True)
    avg = per_class.mean()
    w = np.divide(tf, per_class, out=np.zeros_like(tf), where=per_class > 0) * np.log(1 + avg / tf.sum(axis=0))
    out = []
    for row in w:
        chosen: list[str] = []
        n_words = np.array([t.count(" ") + 1 for t in terms])
        for j in np.lexsort((terms, -n_words, -np.round(row, 12))):  # ties: the bigram first
            if row[j] <= 0 or len(chosen) >= top_n:
                break
            t = str(terms[j])
            if any(t in c.split() for c in chosen if " " in c) or any(c in t.split() for c in chosen):
                continue
            chosen.append(t)
        out.append(chosen)
    return out


# --------------------------------------------------------------------------- relevance / spurious
@dataclass
class RelevanceCalibration:
    """The spurious threshold for one conversation.

    ``null`` [n]: cosine similarities between the conversation embedding and ``n`` random
    database descriptions. ``threshold = percentile(null, percentile)``; a cluster whose
    centroid similarity is below it is flagged.
    """

    conversation_vec: np.ndarray  # [d], unit length
    null: np.ndarray  # [n]
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self):
        self.conversation_vec = _unit(np.asarray(self.conversation_vec, np.float64).reshape(-1))
        self.null = np.asarray(self.null, np.float64).reshape(-1)
        if not 0 < self.percentile < 100:
            raise MonitorError("The spurious percentile must be between 0 and 100.")
        if len(self.null) < 10:
            raise MonitorError("Calibrating the spurious flag needs at least 10 random descriptions.")

    @classmethod
    def from_vectors(cls, conversation_vec: np.ndarray, random_vecs: np.ndarray,
                     percentile: float = DEFAULT_PERCENTILE) -> "RelevanceCalibration":
        """From random description embeddings [n, d] (unit rows)."""
        q = _unit(np.asarray(conversation_vec, np.float64).reshape(-1))
        return cls(q, np.asarray(random_vecs, np.float64) @ q, percentile)

    @property
    def threshold(self) -> float:
        return float(np.percentile(self.null, self.percentile))

    def relevance(self, vec: np.ndarray) -> float:
        """cos(vec, conversation)."""
        return float(_unit(np.asarray(vec, np.float64).reshape(-1)) @ self.conversation_vec)

    def percentile_of(self, sim: float) -> float:
        """Percent of random descriptions less similar to the conversation than ``sim``."""
        return float(100.0 * np.mean(self.null < sim))

    def rule(self) -> str:
        """:data:`SPURIOUS_RULE` with this conversation's numbers, for the UI."""
        return SPURIOUS_RULE.format(n=len(self.null), pct=self.percentile, thr=self.threshold,
                                    rest=100 - self.percentile)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def conversation_text(chat_or_rendered) -> str:
    """The text whose meaning the spurious flag compares against: the user and assistant
    messages' contents (system prompts left out), or the plain prompt."""
    messages = getattr(chat_or_rendered, "messages", None)
    if messages is None and isinstance(chat_or_rendered, (list, tuple)):
        messages = chat_or_rendered
    if messages:
        text = "\n".join(str(m["content"]).strip() for m in messages if m.get("role") != "system")
        if text.strip():
            return text
    text = getattr(chat_or_rendered, "text", chat_or_rendered)
    return str(text)


# --------------------------------------------------------------------------- the report
@dataclass
class Cluster:
    """One concept among the important neurons."""

    id: int
    members: list[NeuronHit]  # heaviest first
    summaries: list[str]  # same order
    weight: float  # Σ member weights: the ranking score
    label: str
    keywords: list[str]
    central: str  # the description closest to the centroid
    cohesion: float  # mean pairwise cosine similarity of members' embeddings
    centroid: np.ndarray = field(repr=False, default=None)  # [d], unit
    label_source: str = "c-tf-idf"  # or "llm"
    coherence: int | None = None  # LLM rating 1–5
    relevance: float | None = None  # cos(centroid, conversation)
    relevance_percentile: float | None = None
    spurious: bool | None = None  # None without a calibration
    explanation: str = ""
    unrelated: bool | None = None  # the relevance rule alone (None without a calibration)
    effect: float | None = None  # measured Δf when its cells are suppressed (causal check)
    predicted: float | None = None  # the attribution's linear prediction −Σ A of that Δf
    null: dict | None = None  # engine.stats.null_position of |effect| among the controls' |Δf|
    moves: bool | None = None  # |effect| beyond the random null (None without the check)
    effect_text: str = ""  # what suppressing it did, in words

    @property
    def neurons(self) -> list[tuple[int, int, int]]:
        return [h.key for h in self.members]

    @property
    def tokens(self) -> dict[int, float]:
        """Token index → summed member weight on it, heaviest first."""
        out: dict[int, float] = {}
        for h in self.members:
            for t, w in h.tokens.items():
                out[t] = out.get(t, 0.0) + w
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def token_rows(self, tokens: Sequence[str]) -> list[dict]:
        """[{index, token, weight}] for a trace's token strings (the cluster's tokens on it)."""
        return [{"index": t, "token": tokens[t] if t < len(tokens) else "", "weight": w} for t, w in self.tokens.items()]

    def to_spec(self, mode: str = "suppress", tokens: TokenRange | str | None = None,
                strength: float | None = None) -> ConceptSpec:
        """A steering spec that steers exactly this cluster's neurons (default: suppress them)."""
        return ConceptSpec(self.label, mode=mode, strength=strength, tokens=tokens if tokens is not None else TokenRange(),
                           neurons=tuple(self.neurons))

    def to_dict(self) -> dict:
        return {
            "id": self.id, "label": self.label, "label_source": self.label_source, "keywords": self.keywords,
            "central": self.central, "weight": self.weight, "size": len(self.members), "cohesion": self.cohesion,
            "coherence": self.coherence, "relevance": self.relevance, "relevance_percentile": self.relevance_percentile,
            "spurious": self.spurious, "explanation": self.explanation, "unrelated": self.unrelated,
            "effect": self.effect, "predicted": self.predicted, "moves": self.moves, "effect_text": self.effect_text,
            "null_percentile": None if self.null is None else self.null["percentile"],
            "null_p": None if self.null is None else self.null["p_empirical"],
            "neurons": [{"layer": h.layer, "neuron": h.neuron, "polarity": h.polarity, "weight": h.weight,
                         "summary": s, "tokens": h.tokens} for h, s in zip(self.members, self.summaries)],
            "tokens": self.tokens,
        }


@dataclass
class LintReport:
    mode: str
    clusters: list[Cluster]  # ranked by weight, heaviest first
    n_hits: int  # important neurons found
    n_described: int  # of which had a description embedding
    threshold: float
    min_size: int
    calibration: RelevanceCalibration | None = None
    warnings: list[str] = field(default_factory=list)
    causal: dict | None = None  # {objective, n_null, alpha, seconds} once causal_check ran

    @property
    def rule(self) -> str:
        """The plain-language spurious rule for this conversation ('' without calibration)."""
        return self.calibration.rule() if self.calibration is not None else ""

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "n_hits": self.n_hits, "n_described": self.n_described, "threshold": self.threshold,
            "min_size": self.min_size, "spurious_threshold": self.calibration.threshold if self.calibration else None,
            "rule": self.rule, "warnings": self.warnings, "causal": self.causal,
            "clusters": [c.to_dict() for c in self.clusters],
        }


def lint(hits: Sequence[NeuronHit], embeddings: np.ndarray, summaries: Sequence[str | None], *,
         mode: str = "attribution", threshold: float = DEFAULT_THRESHOLD, min_size: int = DEFAULT_MIN_SIZE,
         calibration: RelevanceCalibration | None = None, labeler=None,
         progress: Callable[[int, int], None] | None = None) -> LintReport:
    """Cluster, label, rank and flag the important neurons.

    ``embeddings`` [m, d] and ``summaries`` [m] align with ``hits``; a row of zeros / NaN
    (a neuron without a description) is left out of clustering. ``labeler.label`` may
    raise MonitorError: that cluster keeps its offline label and a warning says why.
    ``progress(i, n)`` is called per labelled cluster (LLM labels take a request each).
    """
    emb = np.asarray(embeddings, np.float64)
    if len(hits) != len(emb) or len(hits) != len(summaries):
        raise ValueError("hits, embeddings and summaries must align")
    ok = np.isfinite(emb).all(axis=1) & (np.linalg.norm(emb, axis=1) > 0) if len(emb) else np.zeros(0, bool)
    rows = np.flatnonzero(ok)
    groups = [rows[g] for g in cluster_embeddings(emb[rows], threshold, min_size)] if len(rows) else []
    clustered = set(int(i) for g in groups for i in g)
    rest = [str(summaries[i]) for i in rows if int(i) not in clustered]
    keywords = ctfidf_keywords([[str(summaries[i]) for i in g] for g in groups] + [rest])[: len(groups)]
    warnings: list[str] = []
    if len(rows) < len(hits):
        warnings.append(f"{len(hits) - len(rows)} of {len(hits)} important neurons have no description in the "
                        "database and were not clustered.")
    clusters = []
    for g, kws in zip(groups, keywords):
        g = sorted(g.tolist(), key=lambda i: (-hits[i].weight, i))
        unit = _unit(emb[g])  # [size, d]
        centroid = _unit(unit.mean(axis=0))
        central_i = g[int(np.argmax(unit @ centroid))]
        sims = unit @ unit.T
        size = len(g)
        cohesion = float((sims.sum() - size) / (size * (size - 1))) if size > 1 else 1.0
        central = str(summaries[central_i])
        clusters.append(Cluster(
            id=0, members=[hits[i] for i in g], summaries=[str(summaries[i]) for i in g],
            weight=float(sum(hits[i].weight for i in g)), label=", ".join(kws) if kws else central,
            keywords=kws, central=central, cohesion=cohesion, centroid=centroid,
        ))
    clusters.sort(key=lambda c: (-c.weight, c.members[0].key))
    for i, c in enumerate(clusters):
        c.id = i
        if labeler is not None:
            try:
                c.label, c.coherence = labeler.label(c.summaries)
                c.label_source = "llm"
            except MonitorError as err:
                if not any(w.startswith("LLM labels failed") for w in warnings):
                    warnings.append(f"LLM labels failed, offline labels shown instead: {err}")
        if calibration is not None:
            c.relevance = calibration.relevance(c.centroid)
            c.relevance_percentile = calibration.percentile_of(c.relevance)
            c.unrelated = c.spurious = bool(c.relevance < calibration.threshold)
            c.explanation = explain(c, calibration)
        if progress is not None:
            progress(i + 1, len(clusters))
    return LintReport(mode, clusters, len(hits), int(len(rows)), float(threshold), int(min_size), calibration, warnings)


def explain(cluster: Cluster, calibration: RelevanceCalibration) -> str:
    """One sentence on why ``cluster`` is (not) flagged, with its numbers."""
    rel = calibration.relevance(cluster.centroid) if cluster.relevance is None else cluster.relevance
    pct = calibration.percentile_of(rel)
    thr = calibration.threshold
    if rel < thr:
        return (f"Likely spurious: similarity to the conversation {rel:.3f} is below the threshold {thr:.3f}; "
                f"{100 - pct:.0f}% of random neuron descriptions are at least as related to this conversation.")
    return (f"Related: similarity to the conversation {rel:.3f} is at or above the threshold {thr:.3f} "
            f"(more related than {pct:.0f}% of random neuron descriptions).")


# --------------------------------------------------------------------------- causal check
def cluster_cells(cluster: Cluster) -> list[tuple[int, int, int]]:
    """The (layer, token, neuron) cells a cluster was found on: each member on its tokens."""
    return sorted({(h.layer, t, h.neuron) for h in cluster.members for t in h.tokens})


def causal_check(lm, trace, report: LintReport, n_null: int = DEFAULT_NULL_SETS, seed: int = 0,
                 alpha: float = CAUSAL_ALPHA, batch_size: int = 16, progress=None) -> LintReport:
    """Measure each cluster's effect on the trace's objective and place it in a matched random null.

    Per cluster: its measured ``Δf`` (:func:`engine.effects.suppression_effects`: its cells, the
    members on their tokens, set to 0), the attribution's prediction ``−Σ A``, and ``n_null``
    random sets from :func:`engine.controls.matched_controls` (per member one neuron of the same
    layer on the same tokens, matched on activation mass ``M[l, i] = Σ_{t ∈ cluster tokens} |a[l, t, i]|``,
    seeds ``seed + 1000·k`` for the k-th cluster), all measured in one batched pass.
    :func:`engine.stats.null_position` of ``|Δf|`` among the controls' ``|Δf|`` gives the
    percentile; *moves* = above the null's median with ``p_empirical ≤ alpha``. Updates the
    clusters in place (spurious = unrelated and moves, when calibrated), re-ranks them by
    ``|Δf|`` and returns ``report``. ``progress(n)`` counts measured groups.
    """
    import time

    import torch

    from .controls import matched_controls
    from .effects import predicted_effect, suppression_effects
    from .stats import null_position
    from .steering import Intervention

    if getattr(trace, "objective", None) is None:
        raise MonitorError("The causal check needs a target (or an answer pair): pick one, then lint again.")
    if int(n_null) < DEFAULT_NULL_SETS:
        raise MonitorError(f"The causal check needs at least {DEFAULT_NULL_SETS} random sets; got {n_null}.")
    t0 = time.perf_counter()
    groups, spans = [], []
    toks = [sorted({t for _, t, _ in cluster_cells(c)}) for c in report.clusters]
    got = trace.map_layers("activations", lambda l, a: [a[ts].abs().double().sum(dim=0) for ts in toks])  # by layer
    for k, c in enumerate(report.clusters):
        cells = cluster_cells(c)
        mass = torch.stack([got[l][k] for l in sorted(got)]).numpy()  # [layers, neurons]
        ivs = [Intervention([(h.layer, h.neuron, h.polarity)], "scale", factor=0.0,
                            tokens=TokenRange("positions", tuple(sorted(h.tokens)))) for h in c.members]
        controls = matched_controls(ivs, lm.n_neurons, int(n_null), seed=seed + 1000 * k, mass=mass)
        spans.append((len(groups), len(controls)))
        groups.append(cells)
        for ctrl, _ in controls:
            groups.append(sorted({(l, t, n) for iv in ctrl for l, n, _ in iv.neurons for t in iv.tokens.positions}))
    effects = suppression_effects(lm, trace, groups, batch_size=batch_size, progress=progress)
    label = trace.objective.label
    for c, (i, m) in zip(report.clusters, spans):
        c.effect = float(effects[i])
        c.predicted = predicted_effect(trace, groups[i])
        c.null = null_position(abs(c.effect), np.abs(effects[i + 1:i + 1 + m]))
        c.moves = bool(c.null["percentile"] > 50 and c.null["p_empirical"] <= alpha)
        c.effect_text = describe_effect(c, label)
        if c.unrelated is not None:
            c.spurious = bool(c.unrelated and c.moves)
            c.explanation = (c.explanation + " " + ("It also moves the answer beyond the random null: likely spurious."
                             if c.spurious else "But it does not move the answer beyond the random null: "
                             "not flagged." if c.unrelated else "")).strip()
    report.clusters.sort(key=lambda c: (-abs(c.effect), c.members[0].key))
    for i, c in enumerate(report.clusters):
        c.id = i
    report.causal = {"objective": label, "n_null": int(n_null), "alpha": float(alpha),
                     "seconds": time.perf_counter() - t0, "groups": len(groups)}
    return report


def describe_effect(c: Cluster, objective: str) -> str:
    """One sentence on what suppressing ``c`` did, with its null percentile."""
    verb = "raised" if c.effect > 0 else "lowered"
    n = c.null["n"]
    where = (f"a bigger change than all {n} random matched sets" if c.null["beyond_all"] and c.null["percentile"] > 50
             else f"larger than {c.null['percentile']:.0f}% of {n} random matched sets")
    verdict = "moves the answer" if c.moves else "within the random null"
    return (f"Suppressing its {len(c.members)} neurons {verb} {objective} by {abs(c.effect):.3g} "
            f"(predicted {c.predicted:+.3g}); {where} (p = {c.null['p_empirical']:.3f}): {verdict}.")
