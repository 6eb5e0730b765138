"""The OpenAI wire format the engine speaks: requests in, responses and SSE chunks out.

Parsing is strict and every error names the offending field, so a client gets
an OpenAI-style 4xx body (``{"error": {"message", "type", "param", "code"}}``)
instead of a traceback. The prompt goes through ``kvmarina.prompts`` with the
shared tokenizer, exactly as the router does, so both hash the same tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kvmarina.engine.sampling import SamplingError, SamplingParams
from kvmarina.prompts import PromptError, prompt_tokens
from kvmarina.tokenizer import Tokenizer


class RequestError(ValueError):
    """A request the engine refuses; ``status`` is the HTTP code to answer with."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.code, self.param)


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated completion or chat request, tokenized."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_tokens: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(
    raw: bytes, kind: str, model_name: str, tokenizer: Tokenizer, max_model_len: int
) -> ParsedRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required", "model")
    if model != model_name:
        raise RequestError(
            f"model {model!r} is not served here; this engine serves {model_name!r}",
            "model",
            404,
            "model_not_found",
        )
    try:
        tokens = prompt_tokens(body, kind, tokenizer)
    except PromptError as exc:
        raise RequestError(str(exc), exc.param) from None
    if not tokens:
        raise RequestError("the prompt is empty", "prompt" if kind != "chat" else "messages")
    try:
        params = SamplingParams.from_request(body)
    except SamplingError as exc:
        raise RequestError(str(exc), exc.param) from None
    if len(tokens) >= max_model_len:
        raise RequestError(
            f"the prompt has {len(tokens)} tokens; this model's context is {max_model_len}",
            "messages" if kind == "chat" else "prompt",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return ParsedRequest(kind, model, tokens, params, stream, include_usage)


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class ResponseWriter:
    """Builds the response objects of one request (ids and timestamps fixed once)."""

    def __init__(self, req: ParsedRequest) -> None:
        self.req = req
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if req.kind == "chat" else "text_completion"

    def _choice(self, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
        if self.req.kind == "chat":
            key = "delta" if delta else "message"
            content: dict[str, Any] = {"content": text}
            if not delta:
                content["role"] = "assistant"
            return {"index": 0, key: content, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def full(self, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.req.model,
            "choices": [self._choice(text, finish, False)],
            "usage": use,
        }

    def chunk(self, text: str, finish: str | None) -> bytes:
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        data = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.req.model,
            "choices": [self._choice(text, finish, True)],
        }
        return sse(data)

    def usage_chunk(self, use: dict[str, Any]) -> bytes:
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        return sse(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.req.model,
                "choices": [],
                "usage": use,
            }
        )


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class StopChecker:
    """Incremental detokenization with stop strings.

    ``push(token_text_so_far)`` returns the newly safe text: text is held back
    while it could still be the start of a stop string, and while the decoded
    text ends in a partial UTF-8 character.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.sent = 0
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        for stop in self.stops:
            at = text.find(stop)
            if at != -1:
                self.stopped = True
                out = text[self.sent : at]
                self.sent = at
                return out
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for stop in self.stops:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        safe = max(safe, self.sent)
        out = text[self.sent : safe]
        self.sent = safe
        return out

    def flush(self, text: str) -> str:
        if self.stopped:
            return ""
        out = text[self.sent :]
        self.sent = len(text)
        return out
