"""Turning a client's OpenAI request into the token ids the engine will hash.

The prompt goes through ``kvmarina.prompts.prompt_tokens`` with the tokenizer the
engine loads (the model folder's, chat template included), so router and engine hash
identical tokens. Anything else is a ``BadRequest`` with an OpenAI-style message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvmarina.prompts import PromptError, prompt_tokens
from kvmarina.tokenizer import Tokenizer

#: the OpenAI endpoints the router proxies: path -> request kind (the engine's path is
#: the same)
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


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
    try:
        tokens = prompt_tokens(body, kind, tok)
    except PromptError as exc:
        raise BadRequest(str(exc), param=exc.param) from exc
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest("'max_tokens' must be a non-negative integer", param="max_tokens")
    return ParsedRequest(body, tokens, stream, max_tokens)
