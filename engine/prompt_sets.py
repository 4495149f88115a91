"""Prompt sets for steering experiments: forced-choice items, generated without shortcuts, or loaded.

Provides:

* :class:`Item`: one question (with its context: system prompt, few-shot turns) and its correct
  and wrong answer; ``pair`` ties the two orders of one question together (the unit of resampling);
* :data:`SETS` and :func:`decimal_pairs`: "which decimal is bigger" pairs of several kinds, over
  any range of whole parts, optionally without date-like numbers;
* :data:`FORMATS` and :func:`format_items`: the same pairs asked in several wordings, both orders;
* :func:`decimal_items`: the original headline grid (9.8 vs 9.11 style), kept for comparison;
* :func:`sample_items`, :func:`sample_pairs`, :func:`load_items` / :func:`parse_items`.

Why several sets. In the headline grid (X = 1..10, Y = 2..9, Z = 11..18) the wrong answer always
starts ".1" and, for X ≤ 12, is always a valid month.day date, so anything that lowers
p("1" | "X.") scores 100%. The sets here vary which number is longer, the wrong answer's first
decimal digit and the whole-number range (X ≥ 13: no answer reads as a date):

* ``shorter``: the bigger number has fewer decimals, the wrong one's first decimal digit is
  never 1: X.Y vs X.ZW with 2 ≤ Z < Y (15.8 vs 15.64);
* ``longer``: the mirror: the bigger number has more decimals: X.ZW vs X.Y with Z ≥ Y (15.35 vs 15.2);
* ``equal``: equal length: X.Y0 vs X.ZW with Z < Y (15.80 vs 15.64; 9.80 vs 9.11);
* ``classic``: the headline grid itself (confounded; for comparison only).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import MonitorError

DECIMALS_TEMPLATE = "Which is bigger: {a} or {b}?"
DECIMALS_PREFIX = "The bigger number is "
DEFAULT_X_RANGE = (13, 40)  # no whole part is a month: no answer reads as a date
HELDOUT_X_RANGE = (41, 99)  # never looked at while building the suite
SETS = {
    "shorter": "bigger number has fewer decimals; wrong answer's first decimal digit never 1 (15.8 vs 15.64)",
    "longer": "mirror: bigger number has more decimals (15.35 vs 15.2)",
    "equal": "equal number of decimals (15.80 vs 15.64)",
    "classic": "the headline grid X.Y vs X.1Z, X 1–10 (confounded: wrong answer always starts .1, often a date)",
}
DEFAULT_SETS = ("shorter", "longer", "equal")


@dataclass(frozen=True)
class Item:
    """One forced-choice question: the user message, its context and the two answers.

    ``context`` holds ``(role, content)`` messages before the question (a system prompt, few-shot
    turns); ``raw`` items are plain text without the chat template. Items with the same ``pair``
    are one question in its two orders.
    """

    prompt: str
    correct: str
    wrong: str
    pair: int | None = None
    context: tuple[tuple[str, str], ...] = ()
    raw: bool = False

    def chat(self):
        """What :func:`engine.chat.render_chat` renders: the text (raw) or the messages."""
        if self.raw:
            return self.prompt
        return [{"role": r, "content": c} for r, c in self.context] + [{"role": "user", "content": self.prompt}]

    @classmethod
    def from_chat(cls, chat, correct: str, wrong: str) -> "Item":
        """An item whose question is the last user message of ``chat`` (or plain text)."""
        if isinstance(chat, str):
            return cls(chat, correct, wrong, raw=True)
        msgs = list(chat)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last is None or last != len(msgs) - 1:
            raise MonitorError("The chat must end with a user message to score answers after it.")
        return cls(str(msgs[last]["content"]), correct, wrong,
                   context=tuple((m["role"], str(m["content"])) for m in msgs[:last]))


# --------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class Format:
    """A wording of the question: ``template`` with ``{a}`` and ``{b}``, the reply ``stem``, an
    optional system prompt, few-shot examples (answered as ``stem + bigger + "."``), or plain text."""

    name: str
    template: str
    stem: str
    description: str
    system: str | None = None
    shots: tuple[tuple[str, str], ...] = ()
    raw: bool = False

    def item(self, a: str, b: str, correct: str, wrong: str, pair: int | None = None) -> Item:
        question = _fill(self.template, a, b)
        context: list[tuple[str, str]] = [("system", self.system)] if self.system else []
        for x, y in self.shots:
            big = x if float(x) > float(y) else y
            context += [("user", _fill(self.template, x, y)), ("assistant", f"{self.stem}{big}.")]
        return Item(question, correct, wrong, pair, tuple(context), self.raw)


def _fill(template: str, a: str, b: str) -> str:
    if "{a}" not in template or "{b}" not in template:
        raise MonitorError("The template must contain {a} and {b}, e.g. \"Which is bigger: {a} or {b}?\".")
    try:
        return template.format(a=a, b=b)
    except (KeyError, IndexError, ValueError) as err:
        raise MonitorError(f"The template {template!r} has a field other than {{a}} and {{b}}: "
                           "escape literal braces as {{ }}.") from err


# Few-shot examples use the whole part 0, which no set uses: one of each kind.
SHOTS = (("0.7", "0.25"), ("0.3", "0.45"), ("0.62", "0.18"))
FORMATS = {
    "chat": Format("chat", DECIMALS_TEMPLATE, DECIMALS_PREFIX, "chat question, reply stem 'The bigger number is '"),
    "plain": Format("plain", "Question: Which number is larger, {a} or {b}?\nAnswer:", " The larger number is ",
                    "plain completion without the chat template", raw=True),
    "system": Format("system", "{a} or {b}: which is larger?", "",
                     "'A or B?' with a system prompt asking for the number only, no stem",
                     system="You compare numbers. Reply with the larger of the two numbers and nothing else."),
    "fewshot": Format("fewshot", DECIMALS_TEMPLATE, DECIMALS_PREFIX, "three solved examples as earlier chat turns",
                      shots=SHOTS),
    "heldout": Format("heldout", "Is {a} greater than {b}? Name the greater one.", "The greater one is ",
                      "held-out wording, never looked at while building"),
}
DEFAULT_FORMATS = ("chat", "plain", "system", "fewshot")


# --------------------------------------------------------------------------- pairs
def is_date(number: str) -> bool:
    """Whether ``M.D`` reads as a valid month.day (9.11 → 11 September; 9.80 does not)."""
    whole, _, frac = number.partition(".")
    if not whole.isdigit() or not frac.isdigit():
        return False
    m, d = int(whole), int(frac)
    days = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return 1 <= m <= 12 and 1 <= d <= days[m - 1] and not frac.startswith("0")


# Per kind: which (Y, Z, W) digits qualify, and the (bigger, smaller) numbers they make for whole part X.
_RULES = {
    "shorter": (lambda y, z, w: y >= 3 and 2 <= z < y, lambda x, y, z, w: (f"{x}.{y}", f"{x}.{z}{w}")),
    "longer": (lambda y, z, w: y <= 8 and z >= y, lambda x, y, z, w: (f"{x}.{z}{w}", f"{x}.{y}")),
    "equal": (lambda y, z, w: y >= 2 and z < y, lambda x, y, z, w: (f"{x}.{y}0", f"{x}.{z}{w}")),
}


def _grid(kind: str, x: int) -> Iterator[tuple[str, str]]:
    """Every (bigger, smaller) pair of ``kind`` with whole part ``x`` (Y, Z, W are digits 1–9)."""
    if kind == "classic":
        yield from ((f"{x}.{y}", f"{x}.{z}") for y in range(2, 10) for z in range(11, 19))
        return
    if kind not in _RULES:
        raise MonitorError(f"Unknown prompt set {kind!r}: use one of {', '.join(SETS)}.")
    keep, make = _RULES[kind]
    digits = range(1, 10)
    yield from (make(x, y, z, w) for y in digits for z in digits for w in digits if keep(y, z, w))


def decimal_pairs(kind: str, x_range: tuple[int, int] = DEFAULT_X_RANGE, dates: bool = True) -> list[tuple[str, str]]:
    """Every (bigger, smaller) pair of ``kind`` (:data:`SETS`) with whole part in ``x_range``
    (inclusive); ``dates=False`` drops pairs where either number reads as a month.day date."""
    lo, hi = (int(v) for v in x_range)
    if not 0 <= lo <= hi:
        raise MonitorError(f"--x-range {lo}-{hi} is invalid: use lo-hi with 0 <= lo <= hi, e.g. 13-40.")
    out = [p for x in range(lo, hi + 1) for p in _grid(kind, x)]
    if not dates:
        out = [p for p in out if not (is_date(p[0]) or is_date(p[1]))]
    if not out:
        raise MonitorError(f"The {kind} set has no pairs in {lo}-{hi} with these filters: widen --x-range.")
    return out


def sample_pairs(pairs: Sequence[tuple[str, str]], n: int | None, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` pairs drawn without replacement with ``random.Random(seed)`` (all when n is None or ≥ len)."""
    return sample_items(pairs, n, seed)


def format_items(pairs: Sequence[tuple[str, str]], fmt: Format | str, first_pair: int = 0) -> list[Item]:
    """Each (bigger, smaller) pair asked in ``fmt`` in both orders; pair ids ``first_pair, first_pair+1, …``."""
    if isinstance(fmt, str):
        if fmt not in FORMATS:
            raise MonitorError(f"Unknown question format {fmt!r}: use one of {', '.join(FORMATS)}.")
        fmt = FORMATS[fmt]
    items = []
    for i, (big, small) in enumerate(pairs):
        items.append(fmt.item(big, small, big, small, first_pair + i))
        items.append(fmt.item(small, big, big, small, first_pair + i))
    return items


def decimal_items(template: str = DECIMALS_TEMPLATE, x_values: Sequence[int] = range(1, 11),
                  larger: str = "shorter") -> list[Item]:
    """The headline grid as chat questions, both orders: ``larger="shorter"`` is the ``classic``
    set (9.8 vs 9.11: 10 × 8 × 8 = 640 pairs, 1,280 questions, the size the reference used),
    ``larger="longer"`` its mirror (the ``longer`` set). ``template`` must contain ``{a}`` and ``{b}``.
    """
    if larger not in ("shorter", "longer"):
        raise MonitorError(f"Unknown decimal set {larger!r}: use shorter (9.8 vs 9.11) or longer (9.2 vs 9.35).")
    kind = "classic" if larger == "shorter" else "longer"
    pairs = [p for x in x_values for p in _grid(kind, x)]
    return format_items(pairs, Format("custom", template, DECIMALS_PREFIX, "the --template wording"))


# --------------------------------------------------------------------------- sampling and files
def sample_items(items: Sequence, n: int | None, seed: int = 0) -> list:
    """``n`` entries drawn without replacement with ``random.Random(seed)`` (all when n is None or ≥ len)."""
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
    """Items from JSON-lines text (an upload or a paste); errors name ``name`` and the line.

    Each line: ``{"prompt", "correct", "wrong"}``, optionally ``"system"`` (a system prompt) and
    ``"pair"`` (any value; lines sharing it are one question in several orders, resampled together).
    """
    items, pair_ids = [], {}
    for i, line in enumerate(str(text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as err:
            raise MonitorError(f"{name}:{i} is not valid JSON ({err.msg}): write one "
                               "{\"prompt\": …, \"correct\": …, \"wrong\": …} object per line.") from err
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k].strip()
                                             for k in ("prompt", "correct", "wrong")):
            raise MonitorError(f"{name}:{i} needs non-empty string fields prompt, correct and wrong.")
        if d["correct"].strip() == d["wrong"].strip():
            raise MonitorError(f"{name}:{i} has the same correct and wrong answer.")
        system = d.get("system")
        if system is not None and not isinstance(system, str):
            raise MonitorError(f"{name}:{i}: system must be a string.")
        pair = pair_ids.setdefault(json.dumps(d["pair"]), len(pair_ids)) if "pair" in d else None
        items.append(Item(d["prompt"], d["correct"].strip(), d["wrong"].strip(), pair,
                          (("system", system),) if system else ()))
    if not items:
        raise MonitorError(f"{name} has no prompts: write one JSON object per line.")
    return items


def pair_ids(items: Sequence[Item]) -> list[int]:
    """Each item's resampling unit: its ``pair``, or a unit of its own when it has none."""
    out, fresh = [], 10**9
    for it in items:
        if it.pair is None:
            out.append(fresh)
            fresh += 1
        else:
            out.append(int(it.pair))
    return out
