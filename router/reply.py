"""Where the request path writes its answer: a ``Reply`` takes a whole answer, or the
head of a streamed one and then its chunks. The router's own HTTP front
(``router.front``) implements it straight on the client's socket; ``AiohttpReply``
implements it on an aiohttp response, for the connections aiohttp serves (everything
that is not a plain POST to an OpenAI endpoint) and for apps served by aiohttp alone.

Invariant of every reply: once ``started`` is true the client has (or will have) a
status line, so no other pod may be tried; ``end`` or ``abort`` is called at most once
and after it nothing is written."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from kvmarina.router.requests import BadRequest


class Reply(Protocol):
    """The answer to one client request (see the module's invariant)."""

    started: bool
    #: ``start(framed=True)`` is understood: the chunks written carry their HTTP/1.1
    #: chunk framing already and go out as they are
    takes_framed: bool

    async def whole(
        self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """The complete answer at once."""

    async def start(
        self,
        status: int,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        *,
        framed: bool = False,
    ) -> None:
        """The head of a streamed (chunked) answer."""

    async def write(self, data: bytes) -> None:
        """A piece of a started answer; ``ConnectionResetError`` once the client left."""

    async def end(self) -> None:
        """The started answer is complete."""

    def abort(self) -> None:
        """Cut the connection: the client sees a truncated body, not a short one."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> bytes:
    """An OpenAI-style error document."""
    doc = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json.dumps(doc).encode()


async def send_json(
    reply: Reply, status: int, doc: Any, headers: Mapping[str, str] | None = None
) -> None:
    await reply.whole(status, "application/json", json.dumps(doc).encode(), headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body; ``BadRequest`` (413) past ``limit`` bytes, announced or not."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(
            f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes",
            status=413,
        )
    if request.content_length is not None:
        return await request.read()
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


class AiohttpReply:
    """A ``Reply`` on aiohttp: the handler returns ``response`` once the request path is
    done. Streams are framed by aiohttp (``takes_framed`` is false)."""

    takes_framed = False

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.started = False
        self.response: web.StreamResponse | None = None

    async def whole(
        self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        self.started = True
        self.response = web.Response(
            body=body, status=status, content_type=content_type, headers=headers
        )

    async def start(
        self,
        status: int,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        *,
        framed: bool = False,
    ) -> None:
        assert not framed, "aiohttp frames the chunks itself"
        out = web.StreamResponse(status=status, headers=headers)
        out.content_type = content_type
        self.started = True
        self.response = out
        await out.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.response is not None:
            self.response.force_close()
