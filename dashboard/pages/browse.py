"""Database browser: semantic and keyword search over neuron descriptions, filters, a chart, CSV/Parquet export.

The view lives in the URL (``?q=…&mode=…&layers=lo-hi&pol=…&min_score=…&scorer=…&sort=…&k=…``): opening a
link reproduces it, and every change writes the URL back through ``st.query_params``. Every scorer in the
database is a column with a plain-language badge; the minimum-score filter applies to the chosen scorer and
the table can be sorted by any of them. Semantic results say why they matched (:mod:`cache.search_explain`).
"""

from __future__ import annotations

import io
import re
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from cache.search_explain import SOURCE_BOOST, rank_by_behaviour
from dashboard import charts, links, resources, score_badges, session, widgets
from engine.errors import MonitorError

MODES = ["semantic", "keyword"]
POLARITIES = ["both", "positive", "negative"]
K_MAX = 500
DEFAULT_K = 50
NO_MIN = -1.0  # the min-score slider's "no filter" end
POOL = 4  # semantic candidates (by summary similarity) per result, re-ranked by behaviour
BEHAVIOUR = "behaviour match"

st.title("Database browser")
st.caption("Find neurons by what their descriptions say. Semantic search embeds your text and ranks descriptions by "
           "how well what the neuron does (the tokens its summary names) matches it, the summary's source label "
           "only scaling that (sort by similarity for the whole summary's cosine); keyword search matches the "
           "text literally.")

res = resources.resources(load_model=False)
db = res.dbr.db
if db is None:
    st.error(res.dbr.error or "No neuron database is loaded.")
    st.markdown("Build it with:")
    st.code(resources.build_command(res.cfg.model), language="bash")
    st.stop()

imported = resources.import_note(db)
if imported:
    st.info(imported, icon=":material/input:")
L = db.n_layers
SCORERS = [d["name"] for d in db.scorers()]  # [] for a version-1 database
MAIN = "main score"
SORTS = [BEHAVIOUR, "similarity", *SCORERS]
DEFAULTS = {"q": "", "mode": MODES[0], "layers": (0, L - 1), "pol": POLARITIES[0], "min_score": NO_MIN,
            "scorer": MAIN, "sort": SORTS[0], "k": DEFAULT_K}


def _parse_url() -> tuple[dict, list[str]]:
    """The view the URL asks for (only the keys it has) and a warning per ignored value."""
    qp, out, bad = st.query_params, {}, []
    if "q" in qp:
        out["q"] = str(qp.get("q"))[:500]
    if "mode" in qp:
        if qp.get("mode") in MODES:
            out["mode"] = qp.get("mode")
        else:
            bad.append(f"mode={qp.get('mode')!r} (use semantic or keyword)")
    if "layers" in qp:
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(qp.get("layers")))
        if m and 0 <= int(m[1]) <= int(m[2]) < L:
            out["layers"] = (int(m[1]), int(m[2]))
        else:
            bad.append(f"layers={qp.get('layers')!r} (use lo-hi within 0-{L - 1})")
    if "pol" in qp:
        p = str(qp.get("pol")).strip().lower()
        p = {"+1": "positive", "1": "positive", "-1": "negative", "pos": "positive", "neg": "negative"}.get(p, p)
        if p in POLARITIES:
            out["pol"] = p
        else:
            bad.append(f"pol={qp.get('pol')!r} (use both, positive or negative)")
    if "min_score" in qp:
        try:
            v = float(qp.get("min_score"))
            if not -1.0 <= v <= 1.0:
                raise ValueError
            out["min_score"] = round(v, 2)
        except (TypeError, ValueError):
            bad.append(f"min_score={qp.get('min_score')!r} (use a number from -1 to 1)")
    if "scorer" in qp:
        if qp.get("scorer") in [MAIN, *SCORERS]:
            out["scorer"] = qp.get("scorer")
        else:
            bad.append(f"scorer={qp.get('scorer')!r} (use one of: {', '.join([MAIN, *SCORERS])})")
    if "sort" in qp:
        if qp.get("sort") in SORTS:
            out["sort"] = qp.get("sort")
        else:
            bad.append(f"sort={qp.get('sort')!r} (use one of: {', '.join(SORTS)})")
    if "k" in qp:
        try:
            v = int(qp.get("k"))
            if not 1 <= v <= K_MAX:
                raise ValueError
            out["k"] = v
        except (TypeError, ValueError):
            bad.append(f"k={qp.get('k')!r} (use a whole number from 1 to {K_MAX})")
    return out, bad


def _to_url(view: dict) -> dict:
    """Query parameters of a view, defaults left out."""
    out = {}
    for key, value in view.items():
        if value == DEFAULTS[key]:
            continue
        out[key] = f"{value[0]}-{value[1]}" if key == "layers" else (f"{value:g}" if key == "min_score" else str(value))
    return out


url_view, url_problems = _parse_url()
snapshot = st.session_state.get("_browse_url")
if url_view or url_problems:
    if _to_url({**DEFAULTS, **url_view}) != snapshot:  # a new link (or an edited address): it wins
        for key in DEFAULTS:
            widgets.set_widget(f"browse_{key}", url_view.get(key, DEFAULTS[key]))
for problem in url_problems:
    st.warning(f"Ignored {problem} in the address.")

c1, c2 = st.columns([4, 1])
q = c1.text_input("Search", key=widgets.widget_key("browse_q", ""), max_chars=500,
                  placeholder="A concept, e.g. “Bible verses”, “dates”, “decimal numbers”")
widgets.remember("browse_q")
mode = c2.radio("Search by", MODES, key=widgets.widget_key("browse_mode", MODES[0]), horizontal=True)
widgets.remember("browse_mode")
f1, f2, f3, f5, f4 = st.columns([2, 1.1, 1.4, 1.4, 0.9])
layers = f1.slider("Layers", 0, L - 1, key=widgets.widget_key("browse_layers", (0, L - 1)))
widgets.remember("browse_layers")
pol = f2.selectbox("Polarity", POLARITIES, key=widgets.widget_key("browse_pol", POLARITIES[0]))
widgets.remember("browse_pol")
min_score = f3.slider("Min score", -1.0, 1.0, step=0.05, key=widgets.widget_key("browse_min_score", NO_MIN),
                      help="A description's score by the scorer on the right (the main score: simulation "
                           "correlation). −1 means no filter; descriptions without a value are dropped by any other.")
widgets.remember("browse_min_score")
scorer = f5.selectbox("Score by", [MAIN, *SCORERS], key=widgets.widget_key("browse_scorer", MAIN),
                      format_func=lambda x: x if x == MAIN else score_badges.label(x),
                      help="Which scorer the minimum applies to.")
widgets.remember("browse_scorer")
k = f4.number_input("Results", 1, K_MAX, step=10, key=widgets.widget_key("browse_k", DEFAULT_K))
widgets.remember("browse_k")

sort = st.session_state.get(widgets.widget_key("browse_sort", SORTS[0]), SORTS[0])
view = {"q": q, "mode": mode, "layers": tuple(int(x) for x in layers), "pol": pol, "min_score": round(float(min_score), 2),
        "scorer": scorer, "sort": sort if sort in SORTS else SORTS[0], "k": int(k)}
params = _to_url(view)
if params != {key: str(v) for key, v in st.query_params.to_dict().items()}:
    st.query_params.from_dict(params)
st.session_state["_browse_url"] = params
described = resources.described_layers(db)
st.caption((f"Link to this view: `?{urlencode(params)}`" if params else "Link to this view: this page's address.")
           + (f" · This database describes layers {', '.join(map(str, described))}." if described else ""))

if not q.strip():
    st.info("Type a concept or a keyword to search the descriptions.")
    st.stop()

polarity = {"both": None, "positive": 1, "negative": -1}[pol]
layer_range = None if tuple(layers) == (0, L - 1) else tuple(layers)
min_s = None if min_score <= NO_MIN else float(min_score)
by = None if scorer == MAIN else scorer


def _search() -> pd.DataFrame:
    if mode == "semantic":
        vec = resources.embed_query(q)
        hits = db.semantic_search(vec, k=POOL * int(k), layer_range=layer_range, polarity=polarity, min_score=min_s,
                                  scorer=by)
        hits = rank_by_behaviour(vec, hits, resources.embed_texts, int(k))  # with why each matched
    else:
        hits = db.keyword_search(q, k=int(k), layer_range=layer_range, polarity=polarity, min_score=min_s, scorer=by)
    if SCORERS and len(hits):
        wide = db.scores_wide(hits["layer"].to_numpy(), hits["neuron"].to_numpy(), hits["polarity"].to_numpy())
        hits = pd.concat([hits, wide.set_index(hits.index)], axis=1)
    return hits


try:
    with st.spinner("Searching…"):
        results = session.session_memo("browse", (res.dbr.stamp, q, mode, layer_range, polarity, min_s, by, int(k)),
                                       _search, 6)
except MonitorError as err:
    st.error(str(err))
    st.stop()

if results.empty:
    st.warning(f"No description matches “{q}” with these filters." if mode == "keyword"
               else "No descriptions pass these filters.")
    st.stop()

results = results.copy()
results["url"] = [links.neuron_url(l, n) for l, n in zip(results["layer"], results["neuron"])]
sort = st.selectbox("Sort by", SORTS, key=widgets.widget_key("browse_sort", SORTS[0]),
                    format_func=lambda x: x if x in (BEHAVIOUR, "similarity") else score_badges.label(x),
                    help=f"Order the results by how well the neuron's behaviour matches the query (b · (1 + {SOURCE_BOOST:g} · "
                         "source match)), by the whole summary's similarity (keyword search: best main score first "
                         "for both), or by any scorer (missing values last).")
widgets.remember("browse_sort")
column = "behaviour_rank" if sort == BEHAVIOUR else sort
if column in results and not (sort in (BEHAVIOUR, "similarity") and mode == "keyword"):
    results = results.sort_values(column, ascending=False, na_position="last", kind="stable")
shown = results.assign(polarity=[charts.polarity_name(p) for p in results["polarity"]])
for name in SCORERS:  # a plain-language badge next to every scorer's number
    shown[f"{name} ·"] = [score_badges.verdict(name, v)[0] for v in shown[name]]
st.markdown(f"**{len(results)}** result{'s' if len(results) != 1 else ''} for “{q}” ({mode})")
cols = ["layer", "neuron", "polarity", "behaviour_rank", "similarity", "score"]
for name in SCORERS:
    cols += [name, f"{name} ·"]
cols += ["summary", "why", "description", "url"]
cols = [c for c in cols if c in shown and not (c in ("similarity", "behaviour_rank") and mode == "keyword")]
config = {"similarity": st.column_config.NumberColumn(format="%.3f", width="small",
                                                      help="Cosine of the query to the whole summary."),
          "behaviour_rank": st.column_config.NumberColumn(
              BEHAVIOUR, format="%.3f", width="small",
              help=f"b · (1 + {SOURCE_BOOST:g} · max(s, 0)): b, s the query's cosine to the summary's behaviour and source parts "
                   "(see 'why it matched')."),
          "score": st.column_config.NumberColumn(format="%.2f", width="small",
                                                 help="The main score (held-out simulation correlation)."),
          "layer": st.column_config.NumberColumn(width="small"),
          "neuron": st.column_config.NumberColumn(width="small"),
          "summary": st.column_config.TextColumn(width="medium"),
          "why": st.column_config.TextColumn("why it matched", width="large",
                                             help="Cosine of the query to the summary's behaviour part and to its "
                                                  "source part, and the evidence the description states."),
          "description": st.column_config.TextColumn(width="large"),
          "url": st.column_config.LinkColumn("neuron page", display_text="open ↗", width="small")}
for name in SCORERS:
    config[name] = st.column_config.NumberColumn(score_badges.label(name), format="%.2f", width="small",
                                                 help=score_badges.meaning(name))
    config[f"{name} ·"] = st.column_config.TextColumn("", width="small")
st.dataframe(shown[cols], hide_index=True, key="browse_results", height=420, column_config=config)

st.subheader("Where the results sit")
st.altair_chart(charts.unvalidated(charts.search_scatter(results, L)), key="browse_chart")

export = results.drop(columns=["url"])
slug = re.sub(r"[^a-z0-9]+", "-", q.lower()).strip("-")[:40] or "results"
buf = io.BytesIO()
export.to_parquet(buf, index=False)
d1, d2, _ = st.columns([1, 1, 3])
d1.download_button("Download CSV", export.to_csv(index=False).encode("utf-8"), file_name=f"neurons-{slug}.csv",
                   mime="text/csv", icon=":material/download:", key="export_csv", on_click="ignore")
d2.download_button("Download Parquet", buf.getvalue(), file_name=f"neurons-{slug}.parquet",
                   mime="application/vnd.apache.parquet", icon=":material/download:", key="export_parquet",
                   on_click="ignore")
