"""Render a chat with the tokenizer's chat template and map messages to token ranges.

A chat is a list of ``{"role": ..., "content": ...}`` messages, or plain text. The
rendered text is tokenized once with character offsets, so every token knows which
characters it covers and every message knows which tokens hold its content. That is
what "the last user turn" means when steering: the tokens of the last user message's
content (not the role header around it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

from .errors import MonitorError

Chat = Union[str, list]

VALID_ROLES = {"system", "user", "assistant"}


@dataclass
class RenderedChat:
    text: str
    input_ids: torch.Tensor  # [tokens] int64
    offsets: list[tuple[int, int]]  # per token, character span in ``text``
    tokens: list[str]  # per token, its decoded string
    messages: list[dict] = field(default_factory=list)
    message_spans: list[tuple[int, int]] = field(default_factory=list)  # per message, token range [start, end)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def last_turn(self, role: str = "user") -> tuple[int, int]:
        """Token range [start, end) of the last message with ``role``'s content."""
        for msg, span in zip(reversed(self.messages), reversed(self.message_spans)):
            if msg["role"] == role:
                return span
        raise MonitorError(f"The chat has no {role} message, so there is no last {role} turn to select.")


def normalize_chat(chat: Chat) -> list[dict] | str:
    """Check a chat and return it as messages (or stripped plain text)."""
    if isinstance(chat, str):
        if not chat.strip():
            raise MonitorError("The prompt is empty: type a message or pass --prompt TEXT.")
        return chat
    if not isinstance(chat, (list, tuple)) or not chat:
        raise MonitorError("The chat is empty: give at least one message.")
    messages = []
    for i, msg in enumerate(chat):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise MonitorError(f"Message {i} must look like {{'role': 'user', 'content': '...'}}.")
        if msg["role"] not in VALID_ROLES:
            raise MonitorError(f"Message {i} has role {msg['role']!r}; use one of system, user, assistant.")
        messages.append({"role": msg["role"], "content": str(msg["content"])})
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        raise MonitorError("The prompt is empty: type a message before tracing.")
    return messages


def render_chat(tokenizer, chat: Chat, add_generation_prompt: bool = True, max_tokens: int | None = None) -> RenderedChat:
    """Render ``chat`` to text and tokens; locate each message's content in tokens.

    Plain text is tokenized as-is (with the tokenizer's default special tokens);
    messages go through ``tokenizer.apply_chat_template``. ``max_tokens`` (the model's
    context) bounds the length with a clear error.
    """
    norm = normalize_chat(chat)
    if isinstance(norm, str):
        text = norm
        enc = tokenizer(text, return_offsets_mapping=True)
        messages, char_spans = [], []
    else:
        messages = norm
        if not getattr(tokenizer, "chat_template", None):
            raise MonitorError("This tokenizer has no chat template; pass plain text with --prompt instead of a chat.")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        char_spans, cursor = [], 0
        for msg in messages:
            content = msg["content"].strip()
            start = text.find(content, cursor) if content else -1
            if start < 0:
                char_spans.append((cursor, cursor))
                continue
            char_spans.append((start, start + len(content)))
            cursor = start + len(content)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if max_tokens is not None and len(ids) > max_tokens:
        raise MonitorError(
            f"The prompt is {len(ids)} tokens, longer than the model's context of {max_tokens}; shorten it."
        )
    tokens = [tokenizer.decode([i]) for i in ids]
    spans = [_char_to_token_span(offsets, a, b) for a, b in char_spans]
    return RenderedChat(text, torch.tensor(ids, dtype=torch.long), offsets, tokens, messages, spans)


def _char_to_token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Tokens whose characters overlap [start, end)."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    return (hit[0], hit[-1] + 1) if hit else (0, 0)
