"""Scores in plain words: a label per scorer and a badge per value, for the neuron page and the browser.

Two kinds of scorer are stored (see ``cache/schema.sql``, table ``scores``):

* **correlations** (the simulation scorers: the offline token match, an LLM simulator, an
  imported Transluce score): Pearson r between true and simulated activations, −1…1;
* **AUCs** (``embedding-auc-v1`` on whole windows, ``embedding-span-auc-v1`` on the 16-token
  span around each peak): the chance that an activating window outranks a random one by the
  description's embedding, 0…1, with 0.5 meaning chance.

The cut-offs are conventions for reading, not tests: r ≥ 0.5 strong, ≥ 0.3 moderate,
≥ 0.1 weak, else near zero; AUC ≥ 0.9 strong, ≥ 0.75 good, ≥ 0.6 weak, else near chance.
A missing value (NULL) means the scorer made no prediction, which is not a zero.
"""

from __future__ import annotations

import math

LABELS = {
    "offline-token-match-v2": "simulation (token match)",
    "offline-token-match-v1": "simulation (token match, v1)",
    "embedding-auc-v1": "embedding AUC",
    "embedding-span-auc-v1": "embedding AUC (peak spans)",
}


def is_auc(scorer: str) -> bool:
    return "auc" in scorer.lower()


def label(scorer: str) -> str:
    """A scorer's name for people: ``simulation (token match)``, ``embedding AUC``, or ``simulation (LLM …)``."""
    if scorer in LABELS:
        return LABELS[scorer]
    if scorer.startswith("llm-sim:"):
        return f"simulation (LLM {scorer.split(':', 1)[1]})"
    return scorer


def verdict(scorer: str, value) -> tuple[str, str]:
    """(word, colour) for one score: e.g. ("strong", "green"), ("no prediction", "gray")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "no prediction", "gray"
    v = float(value)
    if is_auc(scorer):
        for cut, word, colour in ((0.9, "strong", "green"), (0.75, "good", "blue"), (0.6, "weak", "orange")):
            if v >= cut:
                return word, colour
        return "near chance", "red"
    for cut, word, colour in ((0.5, "strong", "green"), (0.3, "moderate", "blue"), (0.1, "weak", "orange")):
        if v >= cut:
            return word, colour
    return "near zero", "red"


def meaning(scorer: str) -> str:
    """One sentence saying what a scorer's number measures."""
    if is_auc(scorer) and "span" in scorer:
        return ("How well the description's embedding picks the 16 tokens around each held-out peak out of random "
                "16-token spans (0.5 = chance, 1 = perfect).")
    if is_auc(scorer):
        return ("How well the description's embedding picks the neuron's held-out activating windows out of random "
                "ones (0.5 = chance, 1 = perfect).")
    return ("Correlation between the neuron's true activations and activations simulated from the description alone, "
            "on held-out text (0 = no relation, 1 = perfect).")


def badge_markdown(scorer: str, value) -> str:
    """``**label** 0.62 :green-badge[strong]`` (Streamlit Markdown)."""
    word, colour = verdict(scorer, value)
    shown = "—" if word == "no prediction" else f"{float(value):.2f}"
    return f"**{label(scorer)}** {shown} :{colour}-badge[{word}]"
