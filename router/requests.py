"""Turning a client's OpenAI request into the token ids the engine will hash.

Completions accept ``prompt`` as a string, a list of token ids, or a one-element
list of either; chat requests render ``messages`` with ``kvmarina.chat.render_chat``
and tokenize with the same tokenizer the engine loads, so both hash identical
tokens. Anything else is a ``BadRequest`` with an OpenAI-style message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvmarina.chat import ChatError, render_chat
from kvmarina.tokenizer import Tokenizer


class BadRequest(ValueError):
    """A client error: ``status`` and ``param`` go into the OpenAI error body."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated request. ``tokens`` is what the engine will prefill."""

    body: dict[str, Any]
    tokens: list[int]
    stream: bool
    max_tokens: int


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _prompt_tokens(prompt: Any, tok: Tokenizer) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt
    ):
        return list(prompt)
    raise BadRequest(
        "prompt must be a string, a list of token ids, or a one-element list of either",
        param="prompt",
    )


def parse_request(body: dict[str, Any], kind: str, model: str, tok: Tokenizer) -> ParsedRequest:
    """Validate ``body`` of a ``completions`` or ``chat`` request for serving ``model``."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("missing required field 'model'", param="model")
    if name != model:
        raise BadRequest(
            f"the model {name!r} does not exist; this router serves {model!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    if kind == "chat":
        if "messages" not in body:
            raise BadRequest("missing required field 'messages'", param="messages")
        try:
            tokens = tok.encode(render_chat(body["messages"]))
        except ChatError as exc:
            raise BadRequest(str(exc), param="messages") from exc
    else:
        if "prompt" not in body:
            raise BadRequest("missing required field 'prompt'", param="prompt")
        tokens = _prompt_tokens(body["prompt"], tok)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest("'max_tokens' must be a non-negative integer", param="max_tokens")
    return ParsedRequest(body, tokens, stream, max_tokens)
