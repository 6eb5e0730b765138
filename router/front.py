"""The router's listening socket: a lean HTTP/1.1 front for the hot path, aiohttp for
everything else.

Why not aiohttp alone: on the proxy path its server (request and response objects,
multidicts, the dispatcher, the response writer) cost about 45 us of the router's
CPU per request, a fifth of it, where a purpose-built protocol costs a few.

A connection starts with ``FrontConnection``. Each request whose head ``http1``
accepts (a plain POST to an OpenAI endpoint with a ``Content-Length`` body within the
limit) is read whole and answered by the request path through a ``FrontReply``. At
the first request it does not accept, the connection is handed to aiohttp for good:
its protocol takes the transport and the bytes already read, so ``/metrics``,
``/health``, chunked uploads, ``Expect: 100-continue`` and malformed requests get
exactly what the aiohttp app answers. Requests on one connection are served one at a
time (a pipelined request waits, reading paused past ``PIPELINE_LIMIT`` bytes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from kvmarina.router.http1 import RequestHead, parse_head, response_head
from kvmarina.router.reply import error_body
from kvmarina.router.server import Router
from kvmarina.router.upstream import LAST_CHUNK

log = logging.getLogger("kvmarina.router")
#: a head longer than this is not a plain request (aiohttp answers it)
MAX_HEAD = 65536
#: bytes of pipelined requests buffered before the client is made to wait
PIPELINE_LIMIT = 1 << 20
#: an idle keep-alive connection is closed after this long (aiohttp's default)
KEEPALIVE_S = 75.0


class Front:
    """A router served on ``host:port``. ``start`` runs the aiohttp app's startup (the
    router's background loops); ``close`` stops serving and runs its cleanup."""

    def __init__(self, router: Router, runner: web.AppRunner) -> None:
        self.router = router
        self.runner = runner
        self.conns: set[FrontConnection] = set()
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, router: Router, host: str, port: int, backlog: int = 2048) -> Front:
        runner = web.AppRunner(router.app(), access_log=None)
        await runner.setup()
        front = cls(router, runner)
        loop = asyncio.get_running_loop()
        front.server = await loop.create_server(
            lambda: FrontConnection(front), host, port, backlog=backlog
        )
        front._sweeper = asyncio.create_task(front._sweep())
        return front

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    def aiohttp_protocol(self) -> asyncio.Protocol:
        """A fresh aiohttp protocol for a connection handed over."""
        server = self.runner.server
        assert server is not None, "the runner is set up"
        return server()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.close()
        await self.runner.cleanup()

    async def _sweep(self, every_s: float = 10.0) -> None:
        """Close keep-alive connections idle past ``KEEPALIVE_S`` (and heads that stall)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            now = loop.time()
            for conn in list(self.conns):
                if conn.task is None and now - conn.active_at > KEEPALIVE_S:
                    conn.close()


class FrontConnection(asyncio.Protocol):
    """One client connection while the front serves it (see the module's docstring).

    Invariants: at most one request is served at a time (``task``); ``buf`` holds the
    bytes read past the requests taken so far; ``head`` is the parsed head of the
    request whose body is still arriving."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.buf = b""
        self.head: RequestHead | None = None
        self.body_at = 0
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.eof = False
        self.read_paused = False
        self.write_paused = False
        self.pauses = 0  # times the transport's buffer filled (a client reading slowly)
        self._drain: asyncio.Future[None] | None = None
        self.active_at = self.loop.time()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.front.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        self.active_at = self.loop.time()
        if self.task is None:
            self._next()
        elif len(self.buf) > PIPELINE_LIMIT and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return self.task is not None  # keep the socket open to answer the request in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.conns.discard(self)
        self._wake(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pauses += 1

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake(None)
        if self.task is None and self.buf:
            self._next()

    # -- requests -----------------------------------------------------------------------
    def _next(self) -> None:
        """Take the next request from ``buf`` if it is all there, or hand the connection
        to aiohttp at one the front does not serve."""
        if self.write_paused or self.closed:
            return  # resume_writing comes back here
        buf = self.buf
        head = self.head
        if head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._hand_off()
                return
            head = parse_head(buf[:end])
            if head is None or head.length > self.front.router.cfg.limits.max_body_bytes:
                self._hand_off()
                return
            self.head, self.body_at = head, end + 4
        end = self.body_at + head.length
        if len(buf) < end:
            return
        body, self.buf, self.head = buf[self.body_at : end], buf[end:], None
        self.task = self.loop.create_task(self._serve(head, body))

    async def _serve(self, head: RequestHead, body: bytes) -> None:
        reply = FrontReply(self, head.keep_alive and not self.eof)
        try:
            await self.front.router.proxy.handle(head.headers, body, reply, head.kind, head.path)
        except ConnectionError:
            reply.keep_alive = False  # the client left while it was answered
        except Exception:
            log.exception("request %s failed", head.path)
            if reply.started:
                reply.abort()
            else:
                reply.keep_alive = False
                body = error_body("internal error", "server_error")
                await reply.whole(500, "application/json", body)
        finally:
            self._done(reply)

    def _done(self, reply: FrontReply) -> None:
        self.task = None
        self.active_at = self.loop.time()
        # an answer left unfinished (the request path was cancelled, or never answered)
        # can only be ended by closing: the client would wait for the rest
        if not reply.keep_alive or self.eof or not reply.complete:
            self.close()
            return
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.buf:
            self._next()

    def _hand_off(self) -> None:
        transport = self.transport
        self.front.conns.discard(self)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        protocol = self.front.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        buf, self.buf = self.buf, b""
        protocol.data_received(buf)  # type: ignore[attr-defined]
        if self.eof:
            protocol.eof_received()  # type: ignore[attr-defined]

    # -- writing ------------------------------------------------------------------------
    async def drained(self) -> None:
        """Once the transport's buffer is below its low-water mark again."""
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._drain is None:
            self._drain = self.loop.create_future()
        await self._drain

    def _wake(self, exc: Exception | None) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()


class FrontReply:
    """A ``Reply`` written straight to a front connection's transport."""

    takes_framed = True
    __slots__ = ("complete", "conn", "framed", "keep_alive", "started")

    def __init__(self, conn: FrontConnection, keep_alive: bool) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.started = False
        self.complete = False  # the whole answer is written
        self.framed = False

    async def whole(
        self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        self.started = True
        if not self.conn.closed:
            head = response_head(
                status, content_type, headers, length=len(body), close=not self.keep_alive
            )
            self.conn.transport.write(head + body)
        self.complete = True

    async def start(
        self,
        status: int,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        *,
        framed: bool = False,
    ) -> None:
        self.started = True
        self.framed = framed
        head = response_head(status, content_type, headers, length=None, close=not self.keep_alive)
        await self._send(head)

    async def write(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            await self._send(data if self.framed else b"%x\r\n%s\r\n" % (len(data), data))

    async def end(self) -> None:
        await self._send(LAST_CHUNK)
        self.complete = True

    def abort(self) -> None:
        self.keep_alive = False
        self.conn.close()  # what was written still goes out, then the connection ends

    async def _send(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        conn.transport.write(data)
        if conn.write_paused:
            await conn.drained()
