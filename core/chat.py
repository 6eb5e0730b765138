"""Chat messages -> prompt text, used by router and engine alike.

Router and engine must turn a chat request into the same token ids, or their
block hashes disagree and prefix routing silently stops working. Both call
``render_chat`` (and then the same tokenizer), so there is one place to change.

A model folder's own chat template (Jinja, as Hugging Face ``apply_chat_template``
and so vLLM render it: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the special tokens as variables, text parts of a message joined
by newlines) wins; without one, kvmarina's format ``<|role|>\ncontent\n`` is used.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
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
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    template: str | None = None,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """Render OpenAI-style messages with ``template`` (a model's chat template), or
    without one as ``<|role|>\\ncontent\\n`` turns.

    A stable system prompt renders to the same leading text in every request,
    so it hashes to the same leading blocks: that is what makes it shareable.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError("messages must be a non-empty list")
    if template is not None:
        return _render_template(template, messages, add_generation_prompt, special_tokens or {})
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


def _render_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> str:
    from jinja2 import TemplateError

    plain = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise ChatError(f"messages[{i}] must be an object with a string 'role'")
        content = msg.get("content", "")
        if isinstance(content, list):  # vLLM's "string" content format: text parts, one a line
            content = "\n".join(_content_text([part], i) for part in content)
        elif content is not None and not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string or a list of text parts")
        plain.append({**msg, "content": content})
    try:
        return str(
            _compiled(template).render(
                messages=plain, add_generation_prompt=add_generation_prompt, **special_tokens
            )
        )
    except TemplateError as exc:
        raise ChatError(f"the model's chat template failed: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2 import TemplateError

        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
