"""Steering specs: what to steer, in words, and the deduplicated interventions several specs become.

Provides:

* :class:`ConceptSpec`: one concept ("Bible verses", suppress, top 500) with its filters and
  token range; :meth:`ConceptSpec.parse` reads the CLI short form ``"Bible verses:suppress:500"``;
* :func:`specs_to_json` / :func:`specs_from_json` and :func:`specs_to_url` /
  :func:`specs_from_url` (the compact ``c1.…`` string of a shared ``?steer=`` link);
* :class:`Selection`: the neurons one spec picked, and :func:`layer_counts`;
* :func:`union` → :class:`SteeringUnion`: several selections deduplicated, conflicts and
  overlap reported, and the :class:`~engine.steering.Intervention` list the engine applies.

Spec modes (:data:`SPEC_MODES`, the reference system's defaults):

* ``suppress``: ``a ← 0`` (Intervention ``mode="replace"``, strength 0); top k = 500.
* ``strengthen``: ``a ← strength × Q_p[layer, neuron]`` with ``Q_+1`` the neuron's
  1−1e-7 quantile and ``Q_−1`` its 1e-7 quantile (:data:`engine.activation_view.STEER_QUANTILE`;
  the database snaps these to its stored max / min); strength 0.75, top k = 50.

k is at most :data:`MAX_K` = 1,000. The token range is the last user turn by default,
or the whole prompt, optionally plus every generated token (:mod:`engine.steering`).
Anything malformed raises :class:`~engine.errors.MonitorError` saying what to fix.

Resolving a spec against a neuron database (embed the concept, take the top-k
(layer, neuron, polarity) descriptions by cosine) is :mod:`concepts.resolve`'s job: nothing
here touches the database or Streamlit.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import MonitorError
from .steering import Intervention, TokenRange, parse_token_range, ranges_may_overlap, token_range_text

SPEC_MODES = ("suppress", "strengthen")
DEFAULT_K = {"suppress": 500, "strengthen": 50}
DEFAULT_STRENGTH = {"suppress": 0.0, "strengthen": 0.75}
MAX_K = 1000
MAX_CONCEPT_CHARS = 500
URL_PREFIX = "c1."

Neuron = tuple[int, int, int]  # (layer, neuron, polarity ±1)


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class ConceptSpec:
    """One concept to steer. Validated on construction (raises :class:`MonitorError`).

    ``k`` and ``strength`` default by mode (:data:`DEFAULT_K`, :data:`DEFAULT_STRENGTH`);
    ``keyword``, ``layer_range`` (inclusive), ``min_score`` and ``polarity`` filter the
    candidates before the top-k. ``neurons`` (explicit (layer, neuron, polarity) triples,
    e.g. a linter cluster) replaces the search: those neurons exactly, ``k = len(neurons)``.
    """

    concept: str
    mode: str = "suppress"
    k: int | None = None
    strength: float | None = None
    keyword: str | None = None
    layer_range: tuple[int, int] | None = None
    min_score: float | None = None
    polarity: int | None = None
    tokens: TokenRange = field(default_factory=TokenRange)
    enabled: bool = True
    neurons: tuple[Neuron, ...] | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        concept = self.concept if isinstance(self.concept, str) else ""
        concept = " ".join(concept.split())
        if not concept:
            raise MonitorError("The concept is empty: type what the neurons should be about, e.g. 'Bible verses'.")
        if len(concept) > MAX_CONCEPT_CHARS:
            raise MonitorError(f"The concept is {len(concept)} characters; keep it under {MAX_CONCEPT_CHARS}.")
        set_(self, "concept", concept)
        mode = str(self.mode).strip().lower()
        if mode not in SPEC_MODES:
            raise MonitorError(f"Unknown steering mode {self.mode!r}: use suppress or strengthen.")
        set_(self, "mode", mode)
        if self.neurons is not None:
            set_(self, "neurons", _check_neurons(self.neurons))
            set_(self, "k", len(self.neurons))
        else:
            k = DEFAULT_K[mode] if self.k is None else self.k
            try:
                kf = float(k)
            except (TypeError, ValueError):
                kf = float("nan")
            if isinstance(k, bool) or not kf.is_integer():
                raise MonitorError(f"k must be a whole number from 1 to {MAX_K}, got {self.k!r}.")
            k = int(kf)
            if not 1 <= k <= MAX_K:
                raise MonitorError(f"k = {k} is out of range: pick 1 to {MAX_K} neurons.")
            set_(self, "k", k)
        strength = DEFAULT_STRENGTH[mode] if self.strength is None else _finite(self.strength, "strength")
        if mode == "suppress" and strength != 0:
            raise MonitorError("Suppress sets activations to 0; for another value use mode strengthen with that strength.")
        if mode == "strengthen" and strength == 0:
            raise MonitorError("Strengthen with strength 0 is suppression: use mode suppress, or a non-zero strength.")
        set_(self, "strength", float(strength))
        if self.keyword is not None:
            kw = str(self.keyword).strip()
            set_(self, "keyword", kw or None)
        if self.layer_range is not None:
            try:
                lo, hi = (int(x) for x in self.layer_range)
            except (TypeError, ValueError) as err:
                raise MonitorError("layer_range must be two layer numbers (lo, hi).") from err
            if not 0 <= lo <= hi:
                raise MonitorError(f"Layer range {lo}-{hi} is invalid: use lo-hi with 0 <= lo <= hi.")
            set_(self, "layer_range", (lo, hi))
        if self.min_score is not None:
            set_(self, "min_score", _finite(self.min_score, "min_score"))
        if self.polarity is not None:
            if int(self.polarity) not in (1, -1):
                raise MonitorError(f"Polarity must be 1 or -1, got {self.polarity!r}.")
            set_(self, "polarity", int(self.polarity))
        set_(self, "tokens", parse_token_range(self.tokens))
        set_(self, "enabled", bool(self.enabled))

    # ------------------------------------------------------------------ forms
    @property
    def label(self) -> str:
        """A short human name: ``"Bible verses (suppress 500)"``."""
        extra = f" ×{self.strength:g}" if self.mode == "strengthen" else ""
        return f"{self.concept} ({self.mode} {self.k}{extra})"

    def effect_key(self, polarity: int) -> tuple:
        """What this spec does to one neuron: suppression is the same whatever the polarity."""
        return ("zero",) if self.mode == "suppress" else ("replace", self.strength, int(polarity))

    def to_dict(self) -> dict:
        """Every field, JSON-ready (inverse: :meth:`from_dict`)."""
        return {
            "concept": self.concept, "mode": self.mode, "k": self.k, "strength": self.strength,
            "keyword": self.keyword, "layer_range": list(self.layer_range) if self.layer_range else None,
            "min_score": self.min_score, "polarity": self.polarity, "tokens": token_range_text(self.tokens),
            "enabled": self.enabled, "neurons": [list(n) for n in self.neurons] if self.neurons is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ConceptSpec":
        if not isinstance(d, Mapping):
            raise MonitorError("A steering spec must be a JSON object like {\"concept\": \"Bible verses\", \"mode\": \"suppress\"}.")
        allowed = {"concept", "mode", "k", "strength", "keyword", "layer_range", "min_score", "polarity", "tokens",
                   "enabled", "neurons"}
        unknown = set(d) - allowed
        if unknown:
            raise MonitorError(f"Unknown steering-spec field(s) {', '.join(sorted(map(str, unknown)))}: use "
                               f"{', '.join(sorted(allowed))}.")
        if "concept" not in d:
            raise MonitorError("A steering spec needs a concept, e.g. {\"concept\": \"Bible verses\"}.")
        kw = dict(d)
        if kw.get("neurons") is not None:
            kw["neurons"] = tuple(tuple(n) if isinstance(n, (list, tuple)) else n for n in kw["neurons"])
        if kw.get("layer_range") is not None:
            lr = kw["layer_range"]
            if not isinstance(lr, (list, tuple)) or len(lr) != 2:
                raise MonitorError("layer_range must be [lo, hi].")
            kw["layer_range"] = tuple(lr)
        kw["tokens"] = parse_token_range(kw.get("tokens"))
        try:
            return cls(**kw)
        except TypeError as err:
            raise MonitorError(f"Malformed steering spec: {err}.") from err

    @classmethod
    def parse(cls, text: str) -> "ConceptSpec":
        """The CLI short form ``concept[:mode[:k[:key=value...]]]``.

        ``"Bible verses:suppress:500"``, ``"dates"`` (suppress, 500), ``"love:strengthen:50:strength=1.0"``.
        Keys after k: ``strength``, ``layers`` (``lo-hi``), ``min_score``, ``keyword``,
        ``polarity``, ``tokens`` (see :func:`parse_token_range`). The concept may contain
        ``:`` when no field follows it (``"Genesis 1:3"``). A JSON object is accepted too.
        """
        if not isinstance(text, str) or not text.strip():
            raise MonitorError("The steering spec is empty: write it like 'Bible verses:suppress:500'.")
        text = text.strip()
        if text.startswith("{"):
            return specs_from_json(text)[0]
        parts = text.split(":")
        mode_at = max((i for i, p in enumerate(parts) if i > 0 and p.strip().lower() in SPEC_MODES), default=None)
        if mode_at is None:
            return cls(text)
        concept = ":".join(parts[:mode_at])
        kw: dict = {"mode": parts[mode_at].strip().lower()}
        rest = [p.strip() for p in parts[mode_at + 1:]]
        if rest and "=" not in rest[0]:
            kw["k"] = _int(rest.pop(0), "k")
        i = 0
        while i < len(rest):
            item = rest[i]
            # A positions range contains ':' itself ("tokens=positions:3-7"); glue it back.
            if item.startswith("tokens=positions") and i + 1 < len(rest) and "=" not in rest[i + 1]:
                item = item + ":" + rest[i + 1]
                i += 1
            i += 1
            if "=" not in item:
                raise MonitorError(f"Bad steering field {item!r} in {text!r}: after k, write key=value "
                                   "(strength, layers, min_score, keyword, polarity, tokens).")
            key, value = (s.strip() for s in item.split("=", 1))
            if key == "strength":
                kw["strength"] = _float(value, "strength")
            elif key == "layers":
                m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", value)
                if not m:
                    raise MonitorError(f"Bad layers {value!r}: write lo-hi, e.g. layers=10-20.")
                kw["layer_range"] = (int(m.group(1)), int(m.group(2)))
            elif key == "min_score":
                kw["min_score"] = _float(value, "min_score")
            elif key == "keyword":
                kw["keyword"] = value
            elif key == "polarity":
                kw["polarity"] = _int(value, "polarity")
            elif key == "tokens":
                kw["tokens"] = parse_token_range(value)
            else:
                raise MonitorError(f"Unknown steering field {key!r}: use strength, layers, min_score, keyword, "
                                   "polarity or tokens.")
        return cls(concept, **kw)

    def short(self) -> str:
        """The CLI short form (neuron lists and disabled state are not representable there)."""
        out = [self.concept, self.mode, str(self.k)]
        if self.mode == "strengthen" and self.strength != DEFAULT_STRENGTH["strengthen"]:
            out.append(f"strength={self.strength:g}")
        if self.layer_range:
            out.append(f"layers={self.layer_range[0]}-{self.layer_range[1]}")
        if self.min_score is not None:
            out.append(f"min_score={self.min_score:g}")
        if self.keyword:
            out.append(f"keyword={self.keyword}")
        if self.polarity is not None:
            out.append(f"polarity={self.polarity}")
        if self.tokens != TokenRange():
            out.append(f"tokens={token_range_text(self.tokens)}")
        return ":".join(out)


def _finite(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError) as err:
        raise MonitorError(f"{name} must be a number, got {x!r}.") from err
    if not math.isfinite(v):
        raise MonitorError(f"{name} must be a finite number, got {x!r}.")
    return v


def _int(x, name: str) -> int:
    try:
        return int(str(x).strip())
    except ValueError as err:
        raise MonitorError(f"{name} must be a whole number, got {x!r}.") from err


def _float(x, name: str) -> float:
    return _finite(str(x).strip(), name)


def _check_neurons(neurons) -> tuple[Neuron, ...]:
    out, seen = [], set()
    try:
        items = [tuple(int(v) for v in n) for n in neurons]
    except (TypeError, ValueError) as err:
        raise MonitorError("Explicit neurons must be [layer, neuron, polarity] triples of whole numbers.") from err
    if not items:
        raise MonitorError("The spec's neuron list is empty: give at least one [layer, neuron, polarity].")
    if len(items) > MAX_K:
        raise MonitorError(f"The spec lists {len(items)} neurons; at most {MAX_K} can be steered per spec.")
    for n in items:
        if len(n) != 3 or n[0] < 0 or n[1] < 0 or n[2] not in (1, -1):
            raise MonitorError(f"Neuron {list(n)} is malformed: use [layer >= 0, neuron >= 0, polarity 1 or -1].")
        if n not in seen:
            seen.add(n)
            out.append(n)
    return tuple(out)


# --------------------------------------------------------------------------- serialisation
def specs_to_json(specs: Sequence[ConceptSpec], indent: int | None = None) -> str:
    """A JSON list of :meth:`ConceptSpec.to_dict` objects."""
    return json.dumps([s.to_dict() for s in specs], indent=indent, ensure_ascii=False)


def specs_from_json(text: str) -> list[ConceptSpec]:
    """Specs from JSON: a list of spec objects, one spec object, or ``{"specs": [...]}``."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as err:
        raise MonitorError(f"The steering specs are not valid JSON ({err}): paste the JSON the app exported.") from err
    if isinstance(data, Mapping) and "specs" in data:
        data = data["specs"]
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise MonitorError("The steering JSON must be a list of spec objects.")
    return [ConceptSpec.from_dict(d) for d in data]


_SHORT = {"concept": "c", "mode": "m", "k": "k", "strength": "s", "keyword": "w", "layer_range": "l",
          "min_score": "q", "polarity": "p", "tokens": "t", "enabled": "e", "neurons": "n"}
_LONG = {v: k for k, v in _SHORT.items()}


def specs_to_url(specs: Sequence[ConceptSpec]) -> str:
    """A compact URL-safe string (``c1.`` + base64url(zlib(JSON))) that :func:`specs_from_url` reverses.

    Fields equal to their defaults are left out; explicit neuron lists are flattened.
    Only ``A–Z a–z 0–9 - _ .`` appear, so it can sit in a query parameter unescaped.
    """
    items = []
    for s in specs:
        d = s.to_dict()
        short = {"c": s.concept}
        if s.mode != "suppress":
            short["m"] = "t"
        if s.neurons is not None:
            short["n"] = [v for n in s.neurons for v in n]
        elif s.k != DEFAULT_K[s.mode]:
            short["k"] = s.k
        if s.strength != DEFAULT_STRENGTH[s.mode]:
            short["s"] = s.strength
        for key in ("keyword", "layer_range", "min_score", "polarity"):
            if d[key] is not None:
                short[_SHORT[key]] = d[key]
        if d["tokens"] != "last_user":
            short["t"] = d["tokens"]
        if not s.enabled:
            short["e"] = 0
        items.append(short)
    raw = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()
    return URL_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def specs_from_url(text: str) -> list[ConceptSpec]:
    """Specs from :func:`specs_to_url`'s string (the ``?steer=`` value of a shared link)."""
    if not isinstance(text, str) or not text.strip().startswith(URL_PREFIX):
        raise MonitorError("This steering link is malformed (it should start with 'c1.'): copy the whole link again.")
    body = text.strip()[len(URL_PREFIX):]
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        items = json.loads(raw.decode())
    except (binascii.Error, zlib.error, ValueError, UnicodeDecodeError) as err:
        raise MonitorError("This steering link is damaged or truncated: copy the whole link again.") from err
    if not isinstance(items, list):
        raise MonitorError("This steering link is malformed: copy the whole link again.")
    specs = []
    for item in items:
        if not isinstance(item, Mapping) or set(item) - set(_LONG):
            raise MonitorError("This steering link holds an unknown field: it may come from a newer version.")
        d = {_LONG[k]: v for k, v in item.items()}
        if d.get("mode") not in (None, "t"):
            raise MonitorError("This steering link holds an unknown mode: it may come from a newer version.")
        d["mode"] = "strengthen" if d.get("mode") == "t" else "suppress"
        if "neurons" in d:
            flat = d["neurons"]
            if not isinstance(flat, list) or len(flat) % 3:
                raise MonitorError("This steering link's neuron list is damaged: copy the whole link again.")
            d["neurons"] = [flat[i:i + 3] for i in range(0, len(flat), 3)]
        if "enabled" in d:
            d["enabled"] = bool(d["enabled"])
        specs.append(ConceptSpec.from_dict(d))
    return specs


# --------------------------------------------------------------------------- selections and their union
@dataclass
class Selection:
    """The neurons one spec picked, most similar first (from ``cache.concepts.select``)."""

    spec: ConceptSpec
    neurons: list[Neuron]  # (layer, neuron, polarity)
    similarity: list[float]  # cosine(concept, description), same order; 1.0 for explicit neurons
    summaries: list[str] = field(default_factory=list)  # description summaries, same order (may be empty)

    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def pairs(self) -> set[tuple[int, int]]:
        return {(l, n) for l, n, _ in self.neurons}

    def per_layer(self) -> dict[int, int]:
        return layer_counts(self.pairs)

    @classmethod
    def explicit(cls, spec: ConceptSpec) -> "Selection":
        """The selection of a spec that lists its neurons (no search)."""
        if spec.neurons is None:
            raise MonitorError(f"Spec {spec.concept!r} has no explicit neurons: resolve it against the database.")
        return cls(spec, list(spec.neurons), [1.0] * len(spec.neurons))


def layer_counts(pairs: Iterable[tuple]) -> dict[int, int]:
    """{layer: number of distinct (layer, neuron) pairs in it}, sorted by layer."""
    counts: dict[int, int] = {}
    for l, n in {(int(p[0]), int(p[1])) for p in pairs}:
        counts[l] = counts.get(l, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class SteeringUnion:
    """Several specs' selections combined.

    ``interventions`` is what :func:`engine.generate.generate` / :func:`engine.trace.run_trace`
    take (with the quantile tables from ``cache.concepts.steering_quantiles`` when any spec
    strengthens). ``neurons`` are the distinct (layer, neuron) pairs steered.
    """

    selections: list[Selection]
    interventions: list[Intervention]
    neurons: list[tuple[int, int]]
    duplicates: int  # picks dropped because the same neuron already had the same effect
    conflicts: list[dict]  # picks dropped as contradictory: which neuron, which spec kept / lost, why
    overlap: list[dict]  # per pair of specs: shared (layer, neuron) count and Jaccard index

    def __len__(self) -> int:
        return len(self.neurons)

    def per_layer(self) -> dict[int, int]:
        return layer_counts(self.neurons)

    @property
    def steered(self) -> list[Neuron]:
        """Every (layer, neuron, polarity) the interventions touch, in intervention order."""
        return [tuple(n) for iv in self.interventions for n in iv.neurons]


def union(selections: Sequence[Selection]) -> SteeringUnion:
    """Combine selections into one deduplicated set of interventions.

    Each pick (spec, layer, neuron, polarity) has an effect: suppression (``a ← 0``, the
    same whatever the polarity) or ``a ← strength × Q_polarity``. Picks are visited by
    similarity, highest first (ties: earlier spec, then polarity +1), and for each
    (layer, neuron):

    * a pick with the same effect and token range as a kept pick is a duplicate and counts once;
    * a pick with a *different* effect whose token range may overlap a kept pick's is
      contradictory (e.g. the same neuron strengthened at both polarities, or suppressed
      by one spec and strengthened by another): the **higher-similarity pick wins** and the
      other is listed in ``conflicts``;
    * otherwise (same effect on another range, or disjoint explicit ranges) it is kept too.

    Disabled specs are left out. Overlap between every two specs is reported on their
    (layer, neuron) sets: ``shared = |A ∩ B|``, ``jaccard = |A ∩ B| / |A ∪ B|``.
    """
    sels = [s for s in selections if s.spec.enabled]
    picks = []
    for si, sel in enumerate(sels):
        for (l, n, p), sim in zip(sel.neurons, sel.similarity):
            picks.append((-float(sim) if np.isfinite(sim) else 0.0, si, -int(p), int(l), int(n)))
    picks.sort()
    kept: dict[tuple[int, int], list[tuple[int, int, float]]] = {}  # (l, n) -> [(spec index, polarity, sim)]
    duplicates, conflicts = 0, []
    for neg_sim, si, neg_p, l, n in picks:
        p, spec = -neg_p, sels[si].spec
        effect = spec.effect_key(p)
        verdict = "keep"
        here = kept.get((l, n), [])
        for kj, kp, ksim in here:
            other = sels[kj].spec
            if other.effect_key(kp) != effect and ranges_may_overlap(other.tokens, spec.tokens):
                verdict = "conflict"
                conflicts.append({
                    "layer": l, "neuron": n, "kept": {"spec": other.label, "polarity": kp, "similarity": ksim},
                    "dropped": {"spec": spec.label, "polarity": p, "similarity": -neg_sim},
                    "reason": "contradictory effects on shared tokens; the higher-similarity pick wins",
                })
                break
        if verdict == "keep" and any(sels[kj].spec.effect_key(kp) == effect and sels[kj].spec.tokens == spec.tokens
                                     for kj, kp, _ in here):
            verdict = "duplicate"
        if verdict == "keep":
            kept.setdefault((l, n), []).append((si, p, -neg_sim))
        elif verdict == "duplicate":
            duplicates += 1
    groups: dict[tuple, list[Neuron]] = {}
    labels: dict[tuple, list[str]] = {}
    for (l, n), entries in sorted(kept.items()):
        for si, p, _ in entries:
            spec = sels[si].spec
            key = (spec.mode, spec.strength, spec.tokens)
            groups.setdefault(key, []).append((l, n, p))
            if spec.concept not in labels.setdefault(key, []):
                labels[key].append(spec.concept)
    interventions = [
        Intervention(sorted(neurons), mode="replace", strength=float(strength), tokens=tokens,
                     label=" + ".join(labels[(mode, strength, tokens)]))
        for (mode, strength, tokens), neurons in groups.items()
    ]
    overlap = []
    for i in range(len(sels)):
        for j in range(i + 1, len(sels)):
            a, b = sels[i].pairs, sels[j].pairs
            shared = len(a & b)
            overlap.append({"a": sels[i].spec.label, "b": sels[j].spec.label, "shared": shared,
                            "jaccard": shared / len(a | b) if a | b else 0.0})
    return SteeringUnion(sels, interventions, sorted(kept), duplicates, conflicts, overlap)
