"""Tokens as HTML spans coloured by a neuron's activation (exemplars, the live conversation).

Every token's text (and every tooltip) goes through :func:`html.escape`: exemplar text comes
from arbitrary corpora and the conversation from the user, so ``<script>`` must show as text.
Colours are translucent red (positive) and blue (negative) backgrounds with the theme's text
colour, so the same HTML reads in light and dark themes.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

POS_RGB = (214, 96, 77)  # also the charts' positive colour
NEG_RGB = (67, 147, 195)
POS_HEX = "#d6604d"
NEG_HEX = "#4393c3"

_STYLE = (
    "<style>"
    ".mon-toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:0.85rem;"
    "line-height:1.85;white-space:pre-wrap;word-break:break-word;}"
    ".mon-toks span.t{border-radius:3px;padding:1px 0;}"
    ".mon-toks span.t.mark{outline:2px solid #f0a202;outline-offset:0;}"
    ".mon-toks span.nl{opacity:0.45;}"
    ".mon-meta{font-size:0.78rem;opacity:0.7;margin:0 0 2px 0;}"
    ".mon-chip{display:inline-block;font-family:ui-monospace,monospace;font-size:0.8rem;padding:1px 6px;"
    "margin:2px 3px;border-radius:10px;border:1px solid rgba(128,128,128,0.45);white-space:pre;}"
    "</style>"
)


def show_token(tok: str) -> str:
    """A token made visible: newlines as ↵, tabs as →, empty as ∅."""
    if tok == "":
        return "∅"
    return tok.replace("\n", "↵").replace("\t", "→")


def token_label(i: int, tok: str) -> str:
    """``"<index>: '<token>'"``, at most 60 characters."""
    return f"{i}: {show_token(tok)!r}"[: 60]


def _bg(value: float, scale: float) -> str:
    if not scale or not math.isfinite(value) or value == 0:
        return "transparent"
    x = max(-1.0, min(1.0, value / scale))
    r, g, b = POS_RGB if x > 0 else NEG_RGB
    return f"rgba({r},{g},{b},{0.12 + 0.68 * abs(x):.2f})" if abs(x) >= 0.02 else "transparent"


def token_spans(tokens: Sequence[str], values: Sequence[float] | None = None, scale: float | None = None,
                mark: int | None = None, titles: Sequence[str] | None = None, meta: str | None = None) -> str:
    """One ``<div>`` of tokens; each background ∝ value / scale (clipped to ±1).

    ``scale`` defaults to max |value|. ``mark`` outlines one token (the conversation's target).
    ``titles`` are hover tooltips (default: the token and its value). Newlines show as ``↵``
    followed by a line break.
    """
    vals = [float(v) for v in values] if values is not None else [0.0] * len(tokens)
    if scale is None:
        finite = [abs(v) for v in vals if math.isfinite(v)]
        scale = max(finite) if finite else 0.0
    parts = []
    for i, tok in enumerate(tokens):
        v = vals[i] if i < len(vals) else 0.0
        title = titles[i] if titles is not None else f"{tok!r}  {v:+.3g}"
        text = str(tok)
        newline = text.endswith("\n")
        shown = text.replace("\n", "↵") if text else "∅"
        cls = "t mark" if mark == i else "t"
        parts.append(f'<span class="{cls}" style="background:{_bg(v, scale)}" '
                     f'title="{html.escape(str(title), quote=True)}">{html.escape(shown)}</span>')
        if newline:
            parts.append("\n")
    head = f'<div class="mon-meta">{html.escape(meta)}</div>' if meta else ""
    return f'{_STYLE}{head}<div class="mon-toks">{"".join(parts)}</div>'


def plain_text(text: str, meta: str | None = None) -> str:
    """A text without per-token values (an imported exemplar), in the tokens' box, escaped."""
    head = f'<div class="mon-meta">{html.escape(meta)}</div>' if meta else ""
    return f'{_STYLE}{head}<div class="mon-toks mon-plain">{html.escape(str(text or ""))}</div>'


def chips(items: Sequence[str], title: str | None = None) -> str:
    """Tokens as small rounded chips (promoted/suppressed tokens)."""
    body = "".join(f'<span class="mon-chip">{html.escape(repr(str(t))[1:-1])}</span>' for t in items)
    head = f'<div class="mon-meta">{html.escape(title)}</div>' if title else ""
    return f"{_STYLE}{head}<div>{body or '<em>none recorded</em>'}</div>"
