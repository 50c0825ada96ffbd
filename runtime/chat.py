"""DeepSeek V4 chat rendering: messages -> prompt text, as DeepSeek's own encoder does (no Jinja).

    <bos>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<eos><｜User｜>{user}<｜Assistant｜></think>

In thinking mode the turn being generated opens with `<think>` instead of `</think>`; earlier
assistant turns drop their reasoning (rendered exactly as in chat mode) unless `keep_reasoning`.
Tool calls are not supported here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER


@dataclass(frozen=True)
class Message:
    role: str                 # system, user or assistant
    content: str
    reasoning: str = ""       # an assistant turn's thinking, without the tags


def render(messages: list[Message], thinking: bool = False, keep_reasoning: bool = False) -> str:
    """Prompt text for `messages`. Ends with the assistant opener when the last message is a user turn."""
    if not messages:
        raise UserError("a chat needs at least one message")
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    out = [BOS]
    for i, m in enumerate(messages):
        if m.role == "system":
            if i != 0:
                raise UserError("the system message must come first")
            out.append(m.content)
        elif m.role == "user":
            out.append(USER + m.content)
            following = messages[i + 1].role if i + 1 < len(messages) else None
            if following in (None, "assistant"):
                current = thinking and (keep_reasoning or i >= last_user)
                out.append(ASSISTANT + (THINK if current else END_THINK))
        elif m.role == "assistant":
            if i == 0 or messages[i - 1].role != "user":
                raise UserError(f"assistant message {i} must follow a user message")
            show = thinking and (keep_reasoning or i > last_user)
            out.append((m.reasoning + END_THINK if show else "") + m.content + EOS)
        else:
            raise UserError(f"unknown chat role {m.role!r} (use system, user or assistant)")
    return "".join(out)
