"""Links between pages: page paths for ``st.switch_page`` / ``st.page_link`` and neuron-page addresses."""

from __future__ import annotations

PAGE_CHAT = "pages/chat.py"
PAGE_NEURON = "pages/neuron.py"
PAGE_BROWSE = "pages/browse.py"


def neuron_url(layer: int, neuron: int) -> str:
    """A relative link to the neuron page (opens in a new tab from tables)."""
    return f"neuron?layer={int(layer)}&neuron={int(neuron)}"


def neuron_query(layer: int, neuron: int) -> dict:
    """The neuron page's query parameters, for ``st.switch_page(…, query_params=…)``."""
    return {"layer": str(int(layer)), "neuron": str(int(neuron))}
