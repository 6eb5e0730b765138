"""The one chat template: messages -> prompt text, used by router and engine alike.

Router and engine must turn a chat request into the same token ids, or their
block hashes disagree and prefix routing silently stops working. Both call
``render_chat`` (and then the same tokenizer), so there is one place to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A chat request whose messages cannot be rendered."""


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts, in order
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ChatError(f"messages[{index}].content: only text parts are supported")
        return "".join(parts)
    raise ChatError(f"messages[{index}].content must be a string or a list of text parts")


def render_chat(
    messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> str:
    """Render OpenAI-style messages as ``<|role|>\\ncontent\\n`` turns.

    A stable system prompt renders to the same leading text in every request,
    so it hashes to the same leading blocks: that is what makes it shareable.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError("messages must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        out.append(f"<|{role}|>\n{_content_text(msg.get('content', ''), i)}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)
