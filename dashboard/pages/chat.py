"""Chat and trace (the main page): chat with the model, then see which neurons matter and what they mean.

Flow of one run: read the chat input → validate → stream a reply → trace the conversation
(memoised per conversation and target in :mod:`dashboard.state`) → rank neurons by
activation (÷ extreme quantile) or attribution to the selected target token → join against
the database → table, heatmap, bar chart and the tokens coloured by the inspected neuron.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, highlight, hosted, links, ranking, resources, session, steering_specs, widgets
from dashboard import faithfulness_panel, linter_panel, steering_panel  # noqa: F401  (they register their panels, in this order)
from dashboard.panels import CHAT_PANELS, ChatContext, panel_key
from engine.errors import MonitorError

MODES = ["Activation", "Attribution"]
HEAT_METRICS = ["summed |value|", "count over threshold"]
OBJECTIVES = {"logprob": "log p(target)", "prob": "p(target)", "contrast": "log p(target) − log p(distractor)",
              "answer": "L(answer) − L(versus)"}

# `/?layer=L&neuron=N` is the neuron page's address too: send it there.
_qp = st.query_params
if "layer" in _qp and "neuron" in _qp:
    st.switch_page(links.PAGE_NEURON, query_params={"layer": _qp.get("layer"), "neuron": _qp.get("neuron")})
steering_specs.restore_from_url()  # `?steer=…` (a shared steering link) restores the steering specs

res = resources.resources()
lm = res.lm
msgs = session.messages()


def _distractor_options(target: int) -> list[str]:
    """The model's top-5 next tokens at the target position, the target itself left out: the
    runner-up first (the default distractor)."""
    if target < 1:
        return []
    return [t for t, _ in fwd.top_next[target - 1] if t != tokens[target]]


def _distractor(target: int) -> str | None:
    """The distractor picked in the target box (typed text wins over the picker)."""
    typed = st.session_state.get("w_distractor_text") or ""
    if typed:
        return typed
    options = _distractor_options(target)
    return st.session_state.get(f"w_distractor_{target}", options[0] if options else None)


# --------------------------------------------------------------------------- callbacks
def _clear() -> None:
    st.session_state["messages"] = []
    st.session_state.pop("_pending", None)
    st.session_state.pop("_target_conv", None)


def _regenerate() -> None:
    m = st.session_state.get("messages", [])
    if m and m[-1]["role"] == "assistant":
        m.pop()
    if m and m[-1]["role"] == "user":
        st.session_state["_pending"] = True


def _on_token_click() -> None:
    event = st.session_state.get("token_chart")
    try:
        picked = event.selection[charts.TOKEN_SELECTION] if event else None
    except (KeyError, AttributeError, TypeError):
        picked = None
    if picked:
        pos = picked[0].get("pos") if isinstance(picked, list) else None
        if pos is not None:
            widgets.set_widget("target", int(pos))


def _on_row_select() -> None:
    event = st.session_state.get("neuron_table")
    ids = st.session_state.get("_table_ids", [])
    try:
        rows = event.selection.rows if event else []
    except AttributeError:
        rows = []
    if rows and rows[0] < len(ids):
        widgets.set_widget("inspect", ids[rows[0]])


# --------------------------------------------------------------------------- sidebar: chat settings
with st.sidebar:
    st.subheader("Chat")
    st.text_area("System prompt", key=widgets.widget_key("system_prompt", ""), height=90,
                 placeholder="Optional, e.g. “You are a careful math tutor.”",
                 help="Sent as the first message; empty uses the model's default template.")
    widgets.remember("system_prompt")
    st.slider("Temperature", 0.0, 1.5, step=0.05, key=widgets.widget_key("temperature", session.DEFAULT_TEMPERATURE),
              help="0 is greedy decoding; higher samples more freely.")
    widgets.remember("temperature")
    hosted.clamp_widget("max_new_tokens", res.cfg.max_new_tokens)
    st.slider("Max new tokens", 1, res.cfg.max_new_tokens,
              key=widgets.widget_key("max_new_tokens", min(session.DEFAULT_MAX_NEW_TOKENS, res.cfg.max_new_tokens)),
              help="At most 64 in this hosted demo." if res.cfg.hosted else None)
    widgets.remember("max_new_tokens")
    chat_buttons = st.container()  # filled once this run's message is handled


# --------------------------------------------------------------------------- input
prompt = st.chat_input("Message the model…", key="chat_input", disabled=lm is None)
notice: tuple[str, str] | None = None
if prompt is not None:
    text = prompt if isinstance(prompt, str) else getattr(prompt, "text", "") or ""
    if not text.strip():
        notice = ("warning", "The message is empty: type something before sending.")
    elif len(text) > res.cfg.max_message_chars:
        notice = ("warning", f"The message is {len(text):,} characters long; the limit is "
                             f"{res.cfg.max_message_chars:,} ({'this hosted demo' if res.cfg.hosted else 'MONITOR_MAX_MESSAGE_CHARS'}). "
                             "Shorten it and send again.")
    else:
        msgs.append({"role": "user", "content": text})
        st.session_state["_pending"] = True

st.title("Chat and trace")
st.caption("Chat with the model, pick a token, and see which MLP neurons fire beyond their usual extremes "
           "or push that token — joined with the neuron database's descriptions.")
for problem in res.cfg.problems:
    st.warning(problem)
if res.browse_only or res.model.error:
    if res.browse_only:
        st.info(f"{res.browse_only} Chat and tracing are off.")
    else:
        st.error(f"The model could not be loaded, so chat and tracing are off: {res.model.error} "
                 "Fix MONITOR_MODEL and restart the dashboard.")
    st.page_link(links.PAGE_BROWSE, label="The database browser still works", icon=":material/manage_search:")
if res.dbr.error and lm is not None:
    st.warning(f"{res.dbr.error} Until then chat and tracing work, but values are raw activations "
               "(not normalised by quantiles) and no descriptions are shown.")
elif res.mismatch:
    st.warning(res.mismatch)

chat_col, token_col = st.columns([3, 2], gap="large")

# --------------------------------------------------------------------------- the conversation
with chat_col:
    box = st.container(height=360, border=True)
    with box:
        if not msgs:
            st.caption("No messages yet. Try “Which is bigger: 9.8 or 9.11?”")
        for m in msgs:
            with st.chat_message(m["role"]):
                st.markdown(m["content"] if m["content"].strip() else "_(empty reply)_")
    if notice:
        getattr(st, notice[0])(notice[1])

    if st.session_state.get("_pending") and lm is not None and msgs and msgs[-1]["role"] == "user":
        import time

        from engine.generate import generate

        seed = int(st.session_state.get("gen_seed", 0))
        st.session_state["gen_seed"] = seed + 1
        with box:
            with st.chat_message("assistant"):
                placeholder = st.empty()
                placeholder.markdown("…")
                pieces: list[str] = []

                def _on_token(piece: str) -> None:
                    pieces.append(piece)
                    placeholder.markdown("".join(pieces) + " ▌")

                t0 = time.perf_counter()
                try:
                    gen = generate(lm, session.chat_for_model(), max_new_tokens=min(int(st.session_state["max_new_tokens"]), res.cfg.max_new_tokens),
                                   temperature=float(st.session_state["temperature"]), seed=seed, on_token=_on_token)
                except MonitorError as err:
                    gen = None
                    st.session_state.pop("_pending", None)
                    placeholder.empty()
                    msgs.pop()
                    st.error(f"{err} (The message was not added.)")
                if gen is not None:
                    st.session_state.pop("_pending", None)  # kept until here: a rerun mid-stream restarts the reply
                    session.timings().update(generate_s=time.perf_counter() - t0, generated_tokens=len(gen.token_ids))
                    placeholder.markdown(gen.text if gen.text.strip() else "_(empty reply)_")
                    msgs.append({"role": "assistant", "content": gen.text})

with chat_buttons:
    b1, b2 = st.columns(2)
    b1.button("Regenerate", icon=":material/refresh:", on_click=_regenerate, key="regenerate",
              disabled=lm is None or not msgs, width="stretch", help="Sample the last reply again.")
    b2.button("Clear", icon=":material/delete_sweep:", on_click=_clear, key="clear", disabled=not msgs,
              width="stretch", help="Start a new conversation.")

target_box = token_col.container()
strip_box = st.container()

# --------------------------------------------------------------------------- the trace
rows_shown = pd.DataFrame()
if lm is None or not session.has_conversation():
    with token_col:
        st.info("Send a message: every token of the conversation appears here. Click a token (or pick it) to "
                "make it the target; hover to see the model's top-5 next tokens.")
    st.stop()

chat = session.chat_for_model()
try:
    fwd = session.get_trace(lm, chat)
except MonitorError as err:
    token_col.error(str(err))
    st.stop()
tokens = fwd.tokens
n_tok = len(tokens)
conv = session.conversation_key(chat)

# Target: defaults to the first token of the last reply (or the last token), reset per conversation.
if st.session_state.get("_target_conv") != conv:
    st.session_state["_target_conv"] = conv
    last = fwd.rendered.message_spans[-1] if fwd.rendered.message_spans else (n_tok - 1, n_tok)
    default_target = last[0] if chat[-1]["role"] == "assistant" and last[1] > last[0] else n_tok - 1
    widgets.set_widget("target", int(min(max(default_target, 1), n_tok - 1)))
if not 0 <= int(st.session_state.get("w_target", st.session_state.get("target", 1)) or 0) < n_tok:
    widgets.set_widget("target", n_tok - 1)

st.divider()
c_mode, c_a, c_b, c_c = st.columns([1.3, 1.6, 1.4, 1.4], gap="medium")
with c_mode:
    mode = st.segmented_control("Mode", MODES, key=widgets.widget_key("mode", MODES[0]), required=True,
                                help="Activation: how far each neuron fires beyond its usual extremes. "
                                     "Attribution: how much each neuron pushes the target token.")
    widgets.remember("mode")
    mode = mode or MODES[0]
with c_b:
    skip_sink = st.toggle("Exclude token 0 (attention sink)", key=widgets.widget_key("skip_sink", True),
                          help="A few neurons reach |a| ≈ 3,000 on the first token; leave it out of rankings.")
    widgets.remember("skip_sink")
with c_c:
    heat_metric = st.radio("Heatmap shows", HEAT_METRICS, key=widgets.widget_key("heat_metric", HEAT_METRICS[0]),
                           horizontal=False)
    widgets.remember("heat_metric")

view = resources.get_view(res)
tkey = session.trace_key(lm, chat, None)
target = int(st.session_state.get("w_target") or 0)
value_title = "value"
with c_a:
    if mode == "Activation":
        label = "Threshold: |value ÷ extreme quantile| ≥" if view is not None else "Threshold: |raw activation| ≥"
        default_thr = 1.0 if view is not None else 5.0
        wk = widgets.widget_key("threshold" if view is not None else "threshold_raw", default_thr)
        threshold = st.slider(label, 0.0, 5.0 if view is not None else 100.0, step=0.05 if view is not None else 0.5,
                              key=wk, help="1.0 = at the database's most extreme stored quantile "
                                           "(1 − 1e-5 for positive values, 1e-5 for negative).")
        widgets.remember("threshold" if view is not None else "threshold_raw")
        value_title = "activation ÷ extreme quantile" if view is not None else "raw activation"
    else:
        objective = st.radio("Attribution objective", list(OBJECTIVES), format_func=OBJECTIVES.get, horizontal=True,
                             key=widgets.widget_key("objective", "logprob"),
                             help="activation × ∂objective/∂activation, total derivative through later layers. "
                                  "Contrastive: why the target rather than the distractor (picked next to the "
                                  "target token). Answer level: complete-answer log-probabilities of two answers "
                                  "after the question (typed next to the target token).")
        widgets.remember("objective")
        value_title = f"attribution to {OBJECTIVES[objective]}"

# --------------------------------------------------------------------------- rank
heat = None
note, note_kind = "", "markdown"
if mode == "Activation":
    rows, total = session.session_memo("act_rows", (tkey, view is not None, threshold, skip_sink),
                                     lambda: ranking.activation_rows(fwd, view, threshold, skip_sink))
    heat = session.session_memo("act_heat", (tkey, view is not None, threshold, skip_sink),
                              lambda: ranking.activation_heatmap(fwd, view, threshold, skip_sink))
    note = (f"**{total:,}** neurons reach |{value_title}| ≥ {threshold:g}"
            + (f" (showing the strongest {len(rows):,})" if total > len(rows) else "")
            + (" · token 0 excluded" if skip_sink else "") + ". One row per neuron, at its most extreme token.")
    target_trace = fwd
else:
    target_trace = None
    rows = pd.DataFrame({c: pd.Series(dtype="int64" if c not in ("value", "activation") else "float64")
                         for c in ranking.ROW_COLUMNS})
    okey = None
    if objective == "answer":
        answer = tuple(str(st.session_state.get(k) or "") for k in ("w_answer", "w_versus", "w_stem"))
        if not answer[0].strip() and not answer[1].strip():
            note, note_kind = "Type an answer and the answer to compare it with (next to the target token).", "info"
        else:
            okey = ("answer",) + answer
            try:
                target_trace = session.get_trace(lm, chat, None, answer=answer)
            except MonitorError as err:
                note, note_kind = str(err), "error"
    elif target < 1:
        note, note_kind = "Token 0 has nothing before it to predict it: pick another target token to attribute to.", "info"
    else:
        distractor = _distractor(target) if objective == "contrast" else None
        okey = None if distractor is None else ("contrast", distractor)
        try:
            target_trace = session.get_trace(lm, chat, target, distractor=distractor)
        except MonitorError as err:
            note, note_kind = str(err), "error"
    if target_trace is not None:
        akey = session.trace_key(lm, chat, target if objective != "answer" else None, okey)
        kind = objective if objective in ("logprob", "prob") else "logprob"
        rows = session.session_memo("attr_rows", (akey, objective, skip_sink),
                                  lambda: ranking.attribution_rows(target_trace, kind, session.ATTRIBUTION_TOP_K,
                                                                   skip_sink))
        heat = session.session_memo("attr_heat", (akey, objective, skip_sink),
                                  lambda: ranking.attribution_heatmap(target_trace, kind, rows, skip_sink))
        obj = target_trace.objective
        cells = (f"Top **{len(rows):,}** (layer, token, neuron) cells by |attribution|"
                 + (" · token 0 excluded" if skip_sink else "") + ".")
        if objective == "answer":
            note = (f"Answer level: **{obj.label}** = {target_trace.objective_value:.3f} (complete-answer "
                    f"log-probabilities after the question; the stem's tokens are appended to the trace). " + cells)
        elif obj.kind == "contrast":
            note = (f"Target token **{target}** `{highlight.show_token(tokens[target])}` vs distractor "
                    f"`{highlight.show_token(lm.tokenizer.decode([obj.distractor_id]))}`: {obj.label} = "
                    f"{target_trace.objective_value:.3f} (p = {target_trace.target_prob:.3f}). " + cells)
        else:
            note = (f"Target token **{target}** `{highlight.show_token(tokens[target])}`: p = {target_trace.target_prob:.3f} "
                    f"given the tokens before it. " + cells)
    else:
        target_trace = fwd  # panels still get a trace (activations only)

desc = resources.describe(res, zip(rows["layer"], rows["neuron"]))
table = ranking.join_descriptions(rows, desc)
if res.db is None:
    missing_text = "no database loaded"
else:
    missing_text = "not described"
table["described"] = table["description"].notna()
table["description"] = table["description"].fillna(missing_text)
table["summary"] = table["summary"].fillna(missing_text)
row_tokens = target_trace.tokens if mode == "Attribution" else tokens  # answer level: + the stem's tokens
table["token"] = [highlight.token_label(i, row_tokens[i]) for i in table["token_index"]]
table["polarity_name"] = [charts.polarity_name(p) for p in table["polarity"]]
table["url"] = [links.neuron_url(l, n) for l, n in zip(table["layer"], table["neuron"])]
table["id"] = [f"{l}/{n}" for l, n in zip(table["layer"], table["neuron"])]

getattr(st, note_kind)(note)
fc1, fc3, fc2 = st.columns([3, 1.2, 1.2])
only_described = fc3.toggle("Only described neurons", key=widgets.widget_key("only_described", False),
                            disabled=res.db is None, help="Hide neurons whose layer the database does not describe.")
widgets.remember("only_described")
keyword = fc1.text_input("Filter rows by keyword", key=widgets.widget_key("table_filter", ""),
                         placeholder="e.g. bible, date, decimal — matches description, summary or token")
widgets.remember("table_filter")
top_n = fc2.slider("Bars in the chart", 5, 50, key=widgets.widget_key("top_n", 20))
widgets.remember("top_n")
shown = ranking.keyword_filter(table[table["described"]] if only_described and res.db is not None else table,
                                keyword)
if keyword and shown.empty:
    st.warning(f"No row matches “{keyword}”.")

st.session_state["_table_ids"] = list(shown["id"])
st.dataframe(
    shown[["layer", "neuron", "polarity_name", "token", "value", "activation", "description", "score", "url"]]
    .rename(columns={"polarity_name": "polarity"}),
    hide_index=True, height=380, key="neuron_table", on_select=_on_row_select, selection_mode="single-row",
    column_config={
        "layer": st.column_config.NumberColumn("layer", width="small"),
        "neuron": st.column_config.NumberColumn("neuron", width="small"),
        "polarity": st.column_config.TextColumn("polarity", width="small"),
        "token": st.column_config.TextColumn("token", width="small"),
        "value": st.column_config.NumberColumn(value_title, format="%.3g", width="small"),
        "activation": st.column_config.NumberColumn("raw activation", format="%.3g", width="small"),
        "description": st.column_config.TextColumn("description", width="large",
                                                   help="The database's description for this polarity (hover a cell "
                                                        "for the full text; the inspector below shows both)."),
        "score": st.column_config.NumberColumn("score", format="%.2f", width="small",
                                               help="Simulation score of the description (correlation)."),
        "url": st.column_config.LinkColumn("neuron page", display_text="open ↗", width="small",
                                           help="Opens in a new tab (a new session, without this conversation); "
                                                "“Open neuron” below keeps the conversation."),
    },
)
rows_shown = shown

hc, bc = st.columns([3, 2], gap="large")
with hc:
    st.subheader("Layer × token")
    if heat is not None and len(heat):
        field = "sum_abs" if heat_metric == HEAT_METRICS[0] else "count"
        title = f"Σ |{value_title}|" if field == "sum_abs" else ("neurons over threshold" if mode == "Activation"
                                                               else "top cells")
        if (heat[field] > 0).any():
            st.altair_chart(charts.unvalidated(charts.heatmap(heat, row_tokens, field, title, lm.n_layers)),
                            key="heatmap")
        else:
            st.caption("Nothing over the threshold.")
with bc:
    st.subheader(f"Top {min(top_n, len(shown))} neurons")
    if len(shown):
        st.altair_chart(charts.unvalidated(charts.top_bar(shown, top_n, value_title)), key="top_bar")
    else:
        st.caption("No neurons to show: lower the threshold or clear the filter.")

# --------------------------------------------------------------------------- the inspected neuron
st.subheader("Inspect a neuron")
inspect_ids = list(dict.fromkeys(shown["id"].head(300)))
inspected = None
if inspect_ids:
    if st.session_state.get("w_inspect") not in inspect_ids:
        widgets.set_widget("inspect", inspect_ids[0])
    labels = {r.id: f"L{r.layer}/N{r.neuron} · {r.polarity_name} · {r.token} · {r.summary}"[:120]
              for r in shown.head(300).itertuples()}
    ic1, ic2 = st.columns([3, 1])
    pick = ic1.selectbox("Neuron (or click a table row)", inspect_ids, format_func=lambda i: labels.get(i, i),
                         key=widgets.widget_key("inspect", inspect_ids[0]))
    widgets.remember("inspect")
    layer_i, neuron_i = (int(x) for x in pick.split("/"))
    inspected = (layer_i, neuron_i)
    with ic2:
        st.write("")
        st.page_link(links.PAGE_NEURON, label=f"Open neuron L{layer_i}/N{neuron_i}", icon=":material/open_in_new:",
                     query_params=links.neuron_query(layer_i, neuron_i))
    d = resources.describe(res, [(layer_i, neuron_i)]).iloc[0]
    dc1, dc2 = st.columns(2)
    for col, pol, name in ((dc1, "pos", "Positive"), (dc2, "neg", "Negative")):
        with col:
            text = d[f"description_{pol}"]
            score = d[f"score_{pol}"]
            if isinstance(text, str) and text:
                st.markdown(f"**{name}** · score {score:.2f}" if pd.notna(score) else f"**{name}** · unscored")
                st.markdown(f"> {text}")
            else:
                st.markdown(f"**{name}** · _{missing_text}_")
else:
    st.caption("No neuron to inspect.")

# --------------------------------------------------------------------------- target (top right) and tokens
with target_box:
    st.subheader("Target token")
    target = st.selectbox("Target token", list(range(n_tok)), format_func=lambda i: highlight.token_label(i, tokens[i]),
                          key=widgets.widget_key("target", n_tok - 1), label_visibility="collapsed",
                          help="The token to attribute to, and whose next-token probabilities are shown.")
    widgets.remember("target")
    p = fwd.next_token_prob[target]
    st.markdown(f"p(token {target} | tokens before) = **{p:.3f}**" if p is not None
                else "Token 0 has no prediction before it.")
    st.markdown(f"**Top-5 next tokens after token {target}**")
    top5 = pd.DataFrame(fwd.top_next[target], columns=["next token", "probability"])
    top5["next token"] = [repr(highlight.show_token(t)) for t in top5["next token"]]
    st.dataframe(top5, hide_index=True, key="top5", width="stretch",
                 column_config={"probability": st.column_config.ProgressColumn(
                     "probability", min_value=0.0, max_value=1.0, format="%.3f")})
    if mode == "Attribution" and st.session_state.get("w_objective") == "contrast":
        options = _distractor_options(target)
        if options:
            st.selectbox("Distractor (why the target rather than this?)", options, key=f"w_distractor_{target}",
                         format_func=lambda t: repr(highlight.show_token(t)),
                         help="The model's top next tokens at the target position; the runner-up is the default.")
        st.text_input("…or type a distractor token", key="w_distractor_text", placeholder="e.g. ' 8', or id:N",
                      help="A token string (several tokens: the first that differs from the target) or id:N.")
    if mode == "Attribution" and st.session_state.get("w_objective") == "answer":
        st.text_input("Answer", key="w_answer", placeholder="e.g. 9.8")
        st.text_input("Versus", key="w_versus", placeholder="e.g. 9.11")
        st.text_input("Reply stem before the answers", key="w_stem", placeholder="e.g. The bigger number is ",
                      help="Both answers are appended after the question and this stem; the attribution is to "
                           "L(answer) − L(versus), the experiment scorer's complete-answer log-probabilities.")

with strip_box:
    vals = None
    vtitle = "activation"
    if inspected is not None:
        a = fwd.neuron_row("activations", inspected[0], inspected[1])
        if view is not None:
            vals = view.value(inspected[0], inspected[1], a.numpy()).tolist()
            vtitle = f"L{inspected[0]}/N{inspected[1]} ÷ quantile"
        else:
            vals = a.tolist()
            vtitle = f"L{inspected[0]}/N{inspected[1]} raw"
    st.markdown("**Tokens** · click one to make it the target (outlined in orange); hover for the top-5 next tokens"
                + (f" · coloured by the inspected neuron **L{inspected[0]}/N{inspected[1]}** (red positive, "
                   "blue negative)" if inspected is not None else ""))
    token_data, token_spec = charts.token_chart(tokens, fwd.top_next, fwd.next_token_prob, vals, vtitle, target,
                                                dark=widgets.dark_theme())
    st.vega_lite_chart(token_data, token_spec, key="token_chart", on_select=_on_token_click,
                       selection_mode=charts.TOKEN_SELECTION, width="content")

# --------------------------------------------------------------------------- extension panels (linter, steering)
ctx = ChatContext(res=res, chat=chat, trace=target_trace, mode=mode,
                  target=target if mode == "Attribution" and st.session_state.get("w_objective") != "answer" else None,
                  rows=rows_shown)
for panel in CHAT_PANELS:
    if panel.lazy:
        box = st.expander(panel.title, expanded=panel.expanded, key=panel_key(panel), on_change="rerun")
        if not box.open:
            continue
    else:
        box = st.expander(panel.title, expanded=panel.expanded)
    with box:
        try:
            panel.render(ctx)
        except MonitorError as err:
            st.error(str(err))
