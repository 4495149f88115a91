"""Entry point: ``streamlit run dashboard/app.py``. Page registry and navigation.

Add a page by appending a :class:`PageSpec` to :data:`PAGES` (under an existing or a new
section); it gets a URL path, an entry in the sidebar and ``st.page_link`` support. Pages read
shared state through :mod:`dashboard.state`; panels on the chat page register in
:mod:`dashboard.panels`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each browser session runs its script in its own thread, and every thread that calls torch gets
# its own OpenMP team. With OpenMP's default active spin-waiting, idle teams burn the cores the
# busy one needs: measured on 2 CPUs, a 16-token reply took 6-15 s instead of 1.2 s. Passive
# waiting must be set before torch loads (app.py runs before anything imports it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PageSpec:
    path: str  # relative to dashboard/
    title: str
    icon: str
    url_path: str | None = None  # None for the default page (served at "/")
    default: bool = False


# The page registry: section → pages.
PAGES: dict[str, list[PageSpec]] = {
    "Monitor": [
        PageSpec("pages/chat.py", "Chat and trace", ":material/forum:", default=True),
        PageSpec("pages/neuron.py", "Neuron", ":material/neurology:", url_path="neuron"),
        PageSpec("pages/browse.py", "Database browser", ":material/manage_search:", url_path="browse"),
    ],
    "Steering": [
        PageSpec("pages/steering.py", "Semantic steering", ":material/tune:", url_path="steering"),
        PageSpec("pages/experiments.py", "Experiments", ":material/science:", url_path="experiments"),
    ],
    "System": [
        PageSpec("pages/about.py", "About / status", ":material/info:", url_path="about"),
    ],
}


def build_navigation() -> dict[str, list]:
    nav: dict[str, list] = {}
    for section, specs in PAGES.items():
        nav[section] = [
            st.Page(str(HERE / s.path), title=s.title, icon=s.icon, default=s.default,
                    **({"url_path": s.url_path} if s.url_path else {}))
            for s in specs
        ]
    return nav


def main() -> None:
    st.set_page_config(page_title="Neuron Monitor", page_icon=":material/neurology:", layout="wide",
                       initial_sidebar_state="expanded")
    page = st.navigation(build_navigation(), position="sidebar")
    from dashboard.build_watch import watch
    from dashboard.resources import get_config

    cfg = get_config()
    with st.sidebar:
        st.caption(f"Model `{cfg.model}` · database `{cfg.db_path.name}`" + (" (partial)" if cfg.partial else ""))
        if cfg.hosted:
            st.caption("Hosted demo: messages up to 1,000 characters, replies up to 64 tokens, experiments of about "
                       "a minute. Run it on your own machine for more (see the README).")
    watch(cfg.target, cfg.db_path)  # the build's progress; the partial database's banner; each database when it lands
    page.run()


main()
