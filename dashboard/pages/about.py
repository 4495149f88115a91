"""About / status: which model and database are loaded, the database's meta and row counts, how to build it."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboard import resources

st.title("About / status")
st.caption("A Streamlit monitor for the MLP neurons of Llama models: chat, trace, attribute, and read what each "
           "neuron means from a precomputed DuckDB neuron database.")

res = resources.resources()
cfg = res.cfg
for problem in cfg.problems:
    st.warning(problem)

st.subheader("Model")
if res.model.error:
    st.error(res.model.error)
    st.caption(f"MONITOR_MODEL = `{cfg.model}`. Chat and tracing are off; the database browser still works.")
else:
    lm = res.lm
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("model", lm.name)
    m2.metric("layers × neurons", f"{lm.n_layers} × {lm.n_neurons:,}")
    m3.metric("device · dtype", f"{lm.device.type} · {str(lm.dtype).replace('torch.', '')}")
    m4.metric("context", f"{lm.max_context:,} tokens")
    st.caption(f"Loaded from `{lm.source}`" + (f" in {res.model.load_s:.1f} s" if res.model.load_s else "") + ".")

st.subheader("Neuron database")
st.caption(f"MONITOR_DB = `{cfg.db_path}`" + (f" (the quick partial database, until the full `{cfg.target}` lands)"
                                               if cfg.partial else ""))
db = res.dbr.db
if db is None:
    st.error(res.dbr.error)
    st.markdown("Build it with this command (from the project folder), then reload this page:")
    st.code(resources.build_command(cfg.model), language="bash")
    st.info("Without a database the chat and trace still work: activations are shown raw and no descriptions "
            "are joined.")
else:
    if res.mismatch:
        st.warning(res.mismatch)
    meta = db.meta
    described = resources.described_layers(db)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("model", meta.get("model_id", "?"))
    m2.metric("layers × neurons", f"{db.n_layers} × {db.n_neurons:,}")
    m3.metric("described layers", "all" if described is None else f"{len(described)} of {db.n_layers}",
              help=None if described is None else ", ".join(map(str, described)))
    built = meta.get("build_time", "?")
    m4.metric("built", built.split("T")[0], help=f"build_time {built}")
    from cache.provenance import bundle_note

    if bundle_note(meta):
        st.info(bundle_note(meta), icon=":material/inventory_2:")
    from cache.provenance import lacks_sentences, source_info

    source = source_info(meta) or {}
    rows = [("explainer", meta.get("explainer")), ("scorer", meta.get("scorer")),
            ("embedding model", meta.get("embedding_model")),
            ("sequences × tokens", f"{meta.get('n_sequences')} × {meta.get('seq_len')}" if "seq_len" in meta else None),
            ("corpus profile", meta.get("corpus_profile")), ("schema version", meta.get("schema_version")),
            ("imported from", source.get("format")), ("source location", source.get("location")),
            ("source licence", source.get("licence")), ("lacks", "; ".join(lacks_sentences(meta)) or None),
            ("re-import with", meta.get("import_command")), ("file", str(db.path))]
    if described is not None:
        rows.append(("described layers", ", ".join(map(str, described))))
    st.dataframe(pd.DataFrame([(k, str(v)) for k, v in rows if v is not None], columns=["", "value"]),
                 hide_index=True, key="meta_table", column_config={"value": st.column_config.TextColumn(width="large")})

    st.markdown("**Corpus sources**")
    try:
        sources = pd.DataFrame(json.loads(meta.get("corpus_sources", "[]")))
    except (ValueError, TypeError):
        sources = pd.DataFrame()
    if len(sources):
        cols = [c for c in ("name", "n_sequences", "description", "licence") if c in sources]
        st.dataframe(sources[cols], hide_index=True, key="corpus_sources",
                     column_config={"description": st.column_config.TextColumn(width="large"),
                                    "licence": st.column_config.TextColumn(width="medium")})
    else:
        st.caption("not recorded")

    st.markdown("**Row counts**")
    counts = db.counts()
    st.dataframe(pd.DataFrame({"table": list(counts), "rows": list(counts.values())}), hide_index=True,
                 key="row_counts", column_config={"rows": st.column_config.NumberColumn(format="localized")})
    try:
        versions = json.loads(meta.get("versions", "{}"))
    except ValueError:
        versions = {}
    if versions:
        with st.expander("Library versions of the build"):
            st.dataframe(pd.DataFrame(list(versions.items()), columns=["package", "version"]), hide_index=True)

st.subheader("Configuration")
st.dataframe(pd.DataFrame([
    ("MONITOR_MODEL", cfg.model, "embedded, a local Hugging Face folder, or a hub id"),
    ("MONITOR_DB", str(cfg.db_path), "the neuron database (read-only)"),
    ("MONITOR_MAX_MESSAGE_CHARS", str(cfg.max_message_chars), "longest chat message accepted"),
    ("MONITOR_HOSTED", "1" if cfg.hosted else "", "public-demo limits: 1,000-character messages, 64 generated tokens, "
                                                  "experiments of about a minute"),
], columns=["variable", "value", "meaning"]), hide_index=True, key="config_table")
