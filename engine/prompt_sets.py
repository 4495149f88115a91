"""Prompt sets for steering experiments: forced-choice items, generated or loaded.

Provides:

* :class:`Item`: one question with its correct and wrong answer;
* :func:`decimal_items`: the "X.Y vs X.Z" sets ("Which is bigger: 9.8 or 9.11?");
* :func:`sample_items`: a seeded sample;
* :func:`load_items` / :func:`parse_items`: a JSON-lines file or text of
  ``{"prompt", "correct", "wrong"}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import MonitorError

DECIMALS_TEMPLATE = "Which is bigger: {a} or {b}?"
DECIMALS_PREFIX = "The bigger number is "


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
