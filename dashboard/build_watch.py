"""The sidebar's view of a background database build, and picking the database up when it lands.

While ``make demo``'s background build (``precompute.background``) writes the database, every
page works without it where it can (chat, trace, attribution, steering by neuron id) and says
why descriptions are missing (:func:`dashboard.resources.get_db` words the error from the
build's progress). The sidebar shows the stage, its progress and time left, refreshed every few
seconds by a fragment; when the database file appears (its stamp changes) the fragment reruns
the whole page, and :func:`dashboard.resources.get_db`, whose cache key is the file's stamp,
opens it: no restart.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

REFRESH_S = 3.0


def watch(db_path: Path) -> None:
    """Show the build of ``db_path`` in the sidebar while the file is missing (nothing otherwise)."""
    from cache.build_status import read_status

    if Path(db_path).exists() or read_status(db_path) is None:
        return
    with st.sidebar:
        _panel(str(db_path))


@st.fragment(run_every=REFRESH_S)
def _panel(db_path: str) -> None:
    from cache.build_status import read_status

    path = Path(db_path)
    if path.exists():
        st.rerun(scope="app")  # the database landed: every page reruns and opens it
    status = read_status(path)
    if status is None:
        return
    frac = status.fraction()
    with st.container(border=True):
        st.markdown("**Neuron database: building**" if status.running else "**Neuron database: build stopped**")
        if status.running and frac is not None:
            st.progress(frac, text=f"{status.stage} · {frac:.0%}")
        st.caption(status.sentence())
