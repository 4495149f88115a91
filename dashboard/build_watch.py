"""The sidebar's view of a background database build, the partial-database banner, and picking up
each database when it lands.

While ``make demo``'s background build (``precompute.background``) writes the database, every
page works without it where it can (chat, trace, attribution, steering by neuron id) and says
why descriptions are missing (:func:`dashboard.resources.get_db` words the error from the
build's progress). The build first writes a quick partial database (``precompute.quick``): while
the full one is missing, :func:`dashboard.resources.get_config` opens that one, and a banner over
every page says what it covers and how far the full build is.

The sidebar shows the stage, its progress and time left, refreshed every few seconds by a
fragment (the banner too). When the file to open changes (the partial database appears, or the
full one lands and supersedes it; :func:`cache.paths.resolve_db_path`) the fragment reruns the
whole page, and :func:`dashboard.resources.get_db`, whose cache key is the file and its stamp,
opens it: no restart.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

REFRESH_S = 3.0


def watch(target: Path, opened: Path | None = None) -> None:
    """Watch the database ``target`` (the full one) while pages show ``opened`` (``target``, or its
    quick partial database): a banner over the page while ``opened`` is the partial one, and the
    build in the sidebar while ``target`` is missing (nothing when neither applies)."""
    from cache.build_status import read_status

    target = Path(target)
    opened = Path(opened) if opened is not None else target
    if opened != target:
        _banner(str(target), str(opened))
    if target.exists() or read_status(target) is None:
        return
    with st.sidebar:
        _panel(str(target), str(opened))


def _rerun_if_moved(target: str, opened: str) -> None:
    """Rerun every page when the file to open is no longer ``opened`` (a database landed)."""
    from cache.paths import resolve_db_path

    if resolve_db_path(Path(target)) != Path(opened):
        st.rerun(scope="app")


@st.fragment(run_every=REFRESH_S)
def _banner(target: str, opened: str) -> None:
    from cache.build_status import partial_banner, read_status
    from dashboard.resources import get_config, get_db

    _rerun_if_moved(target, opened)
    dbr = get_db(get_config())
    meta = dbr.db.meta if dbr.db is not None else {}
    st.warning(partial_banner(meta, read_status(Path(target))), icon=":material/hourglass_top:")


@st.fragment(run_every=REFRESH_S)
def _panel(target: str, opened: str) -> None:
    from cache.build_status import read_status

    _rerun_if_moved(target, opened)
    status = read_status(Path(target))
    if status is None:
        return
    frac = status.fraction()
    with st.container(border=True):
        what = "Neuron database" if not status.chained else f"Neuron database ({status.build} build)"
        st.markdown(f"**{what}: building**" if status.running else f"**{what}: build stopped**")
        if status.running and frac is not None:
            st.progress(frac, text=f"{status.stage} · {frac:.0%}")
        st.caption(status.sentence())
