"""Semantic steering on its own page: the same specs as the chat page's panel, on a prompt typed here.

A shared link (``steering?steer=…``) opens here with its specs restored
(:func:`dashboard.steering_specs.restore_from_url`).
"""

from __future__ import annotations

import streamlit as st

from dashboard import resources, session, steering_panel, steering_specs, widgets

QUESTION = "Which is bigger: 9.8 or 9.11?"

steering_specs.restore_from_url()
st.title("Semantic steering")
res = resources.resources()
imported = resources.import_note(res.dbr.db)
if imported:
    st.caption(f"{imported} Steering uses its descriptions (searched with our embedder) and its quantiles.")
if res.browse_only:
    st.info(f"{res.browse_only} Specs can be edited, but their effect cannot be shown.")
elif res.model.error:
    st.warning(f"The model could not be loaded, so specs can be edited but their effect cannot be shown: "
               f"{res.model.error}")

last_user = next((m["content"] for m in reversed(session.messages()) if m["role"] == "user"), None)
st.text_area("Prompt (the user turn steering acts on)", key=widgets.widget_key("steer_prompt", last_user or QUESTION),
             height=80, help="Defaults to the chat's last user message. The chat page's system prompt is used too.")
prompt = widgets.remember("steer_prompt") or ""
if not prompt.strip():
    st.warning("The prompt is empty: type the question to steer, e.g. “Which is bigger: 9.8 or 9.11?”.")
    chat: list[dict] = []
elif len(prompt) > res.cfg.max_message_chars:
    st.warning(f"The prompt is {len(prompt):,} characters long; the limit is {res.cfg.max_message_chars:,}.")
    chat = []
else:
    chat = session.chat_for_model([{"role": "user", "content": prompt}])
steering_panel.render(res, chat)
