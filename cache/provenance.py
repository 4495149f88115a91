"""Where a database's rows came from, and what an imported one lacks, in words.

A database built here has everything the pages show. One imported from another publisher
(:mod:`cache.importers`) has only what that publisher released; meta ``lacks`` lists the
missing pieces by name and :data:`LACKS` says what each means for a reader. The dashboard,
``python -m cache info`` and the importers all use these sentences, so they agree.
"""

from __future__ import annotations

import json
from typing import Mapping

# What a source may not publish → what that means on the pages.
LACKS = {
    "per_token_activations": "exemplars carry their text and peak activation only, so their tokens cannot be "
                             "highlighted and there is no activation histogram",
    "output_tokens": "no output tokens (what each neuron promotes or suppresses through the unembedding)",
    "random_exemplars": "no random exemplars",
    "negative_polarity": "descriptions and exemplars of the positive side only (the negative polarity was not "
                         "published)",
    "lower_quantiles": "only the top of each neuron's activation range (q = 1, the published max), so negative "
                       "live activations are not normalised",
    "exemplars": "no exemplars",
    "corpus": "no corpus of our own: the exemplar texts are the publisher's",
}


def _json_dict(meta: Mapping[str, str], key: str) -> dict | None:
    """Meta ``key`` as a JSON object, or None when absent or unreadable."""
    raw = meta.get(key)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def source_info(meta: Mapping[str, str]) -> dict | None:
    """Meta ``source`` as a dict, or None for a database built here (or unreadable meta)."""
    return _json_dict(meta, "source")


def lacks(meta: Mapping[str, str]) -> list[str]:
    """Meta ``lacks`` as a list of names (empty for a built database)."""
    try:
        names = json.loads(meta.get("lacks") or "[]")
    except (TypeError, ValueError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def lacks_sentences(meta: Mapping[str, str]) -> list[str]:
    """One sentence per thing the database lacks; an unknown name is shown as it is."""
    return [LACKS.get(name, name.replace("_", " ")) for name in lacks(meta)]


def bundle_note(meta: Mapping[str, str]) -> str | None:
    """One line saying a database is a hosting bundle (cache/bundle.py) and what it leaves out; None otherwise."""
    if not meta.get("bundle"):
        return None
    info = _json_dict(meta, "bundle") or {}
    return (f"A compact hosting bundle of {info.get('source', 'a built database')}: the "
            f"{info.get('exemplars_per_side', 'few')} most extreme exemplars per neuron and side, no random "
            "exemplars, description embeddings as int8 codes.")


def summary(meta: Mapping[str, str]) -> str | None:
    """One line naming the import and what it lacks, or None for a built database, e.g.
    "Imported from Transluce NeuronDB (descriptions_launch_241020): it has no per-token …"."""
    info = source_info(meta)
    if info is None:
        return None
    what = info.get("format") or info.get("name") or "another publisher"
    line = f"Imported from {what}"
    if info.get("version"):
        line += f" ({info['version']})"
    missing = lacks_sentences(meta)
    return line + (": " + "; ".join(missing) + "." if missing else ".")
