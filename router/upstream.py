"""A lean HTTP/1.1 client for the router's hop to the engines.

Why not aiohttp's client: on the proxy path it cost about a quarter of the
router's CPU per request (cookie jar, tracing hooks, multidicts), and the router
only ever sends one kind of request: a POST with a JSON body to a known pod.
This client keeps a bounded pool of keep-alive connections per pod, writes the
request in one call and parses ``Content-Length``, ``chunked`` and
close-delimited bodies. A request that fails on a *reused* connection before
any response byte arrived (the pod closed an idle connection) is retried once
on a fresh connection, which is safe because nothing was processed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

READ_CHUNK = 65536
#: a pod's answer buffered beyond this pauses reading from it (the client reads slowly)
BUFFER_LIMIT = 1 << 20
LAST_CHUNK = b"0\r\n\r\n"  # the empty chunk that ends a chunked body
#: a response head longer than this is refused
MAX_HEAD = 1 << 20


class UpstreamError(OSError):
    """The pod could not be reached or sent a malformed response."""


class _Conn(asyncio.Protocol):
    """One connection to a pod: what arrives is appended to ``buf``, and the one reader
    of the connection (the request on it) takes from there, waiting on ``_waiter`` for
    more. A protocol rather than asyncio's streams: the request path reads a head and a
    body, and the streams' layers (a reader, a writer, a protocol between them) cost a
    proxy a few microseconds a request for nothing it uses.

    Invariants: at most one coroutine waits at a time; once ``eof`` no byte is added;
    reading is paused while ``buf`` holds more than ``BUFFER_LIMIT`` bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.reused = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > BUFFER_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the reader's side --------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Idle, open, and nothing unasked-for in its buffer."""
        t = self.transport
        return not self.eof and not self.buf and t is not None and not t.is_closing()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection to the pod is closed")
        self.transport.write(data)

    async def _more(self) -> None:
        """Wait for bytes beyond those in ``buf``; ``IncompleteReadError`` at the end."""
        if self.eof:
            raise asyncio.IncompleteReadError(bytes(self.buf), None)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def readuntil(self, sep: bytes, limit: int) -> bytes:
        """Up to and including ``sep``; ``UpstreamError`` past ``limit`` bytes."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                return self._take(i + len(sep))
            if len(self.buf) > limit:
                raise UpstreamError(f"no {sep!r} in the first {limit} bytes")
            start = max(0, len(self.buf) - len(sep) + 1)
            await self._more()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        return self._take(n)

    async def read(self, n: int) -> bytes:
        """At most ``n`` bytes, as soon as there are any; ``b""`` at the end."""
        if not self.buf:
            try:
                await self._more()
            except asyncio.IncompleteReadError:
                return b""
        return self._take(n)

    async def readline(self) -> bytes:
        """A line with its ``\\n``, or what is left at the end."""
        try:
            return await self.readuntil(b"\n", BUFFER_LIMIT)
        except asyncio.IncompleteReadError as exc:
            self.buf.clear()
            return exc.partial

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(slots=True)
class UpstreamResponse:
    """A response whose body is read at most once (``read`` or ``iter_chunks``).

    Invariant: the connection returns to the pool only when the body was read
    to its end and the pod allows keep-alive; otherwise it is closed."""

    status: int
    headers: dict[str, str]
    _conn: _Conn | None
    _pool: UpstreamPool
    _key: str
    _keep_alive: bool
    _done: bool = field(default=False)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/octet-stream").split(";")[0]

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        assert self._conn is not None, "body already consumed"
        reader = self._conn
        te = self.headers.get("transfer-encoding", "").lower()
        try:
            if "chunked" in te:
                while True:
                    line = await reader.readline()
                    if not line:
                        raise UpstreamError("connection closed inside a chunked body")
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    yield await reader.readexactly(size)
                    await reader.readexactly(2)
            elif "content-length" in self.headers:
                left = int(self.headers["content-length"])
                while left > 0:
                    data = await reader.read(min(left, READ_CHUNK))
                    if not data:
                        raise UpstreamError("connection closed before the body ended")
                    left -= len(data)
                    yield data
            else:
                self._keep_alive = False
                while data := await reader.read(READ_CHUNK):
                    yield data
            self._done = True
        except (asyncio.IncompleteReadError, ValueError) as exc:
            raise UpstreamError(f"malformed response body: {exc!r}") from exc
        finally:
            self.release()

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    async def iter_framed(self) -> AsyncIterator[bytes]:
        """A chunked body's bytes as they came, chunk framing included, up to (not
        including) its last, empty chunk: what a proxy relays to a client of its own
        chunked response without taking each chunk apart and framing it again (a
        streamed completion is a chunk a token). The framing is still followed, to
        find the body's end; a relay ends it with ``LAST_CHUNK``."""
        assert self._conn is not None, "body already consumed"
        reader = self._conn
        left = 0  # bytes of the current chunk (data and CRLF) not yet passed
        line = b""  # a chunk-size line begun in an earlier read
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    raise UpstreamError("connection closed inside a chunked body")
                if line:
                    data, line = line + data, b""
                pos, n = 0, len(data)
                while pos < n:
                    if left:
                        step = left if left < n - pos else n - pos
                        pos, left = pos + step, left - step
                        continue
                    eol = data.find(b"\n", pos)
                    if eol < 0:  # the size line goes on in the next read
                        data, line = data[:pos], data[pos:]
                        break
                    size = int(data[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        if pos:
                            yield data[:pos]
                        await self._trailers(data[eol + 1 :])
                        self._done = True
                        return
                    left, pos = size + 2, eol + 1
                if data:
                    yield data
        except ValueError as exc:
            raise UpstreamError(f"malformed response body: {exc!r}") from exc
        finally:
            self.release()

    async def _trailers(self, seen: bytes) -> None:
        """Read past the trailer section (its lines, then an empty one)."""
        assert self._conn is not None
        buf = seen
        while True:
            eol = buf.find(b"\n")
            if eol < 0:
                more = await self._conn.read(READ_CHUNK)
                if not more:
                    raise UpstreamError("connection closed inside a chunked body's trailers")
                buf += more
                continue
            if not buf[:eol].strip():
                if buf[eol + 1 :]:  # bytes past the response: the connection is not reusable
                    self._keep_alive = False
                return
            buf = buf[eol + 1 :]

    async def read(self) -> bytes:
        length = self.headers.get("content-length", "")
        if not length.isdecimal() or self._conn is None or "transfer-encoding" in self.headers:
            return b"".join([c async for c in self.iter_chunks()])
        # the usual answer: one read of a known length (no async generator to drive)
        try:
            body = await self._conn.readexactly(int(length))
            self._done = True
        except asyncio.IncompleteReadError:
            raise UpstreamError("connection closed before the body ended") from None
        finally:
            self.release()
        return body

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive:
            self._pool._put(self._key, conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections per ``scheme://host:port``, at most ``max_idle`` idle each."""

    def __init__(self, connect_timeout_s: float = 2.0, max_idle: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self._idle: dict[str, list[_Conn]] = defaultdict(list)

    def _put(self, key: str, conn: _Conn) -> None:
        idle = self._idle[key]
        if len(idle) < self.max_idle and conn.usable:
            conn.reused = True
            idle.append(conn)
        else:
            conn.close()

    async def _get(self, base: str) -> _Conn:
        idle = self._idle[base]
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            conn.close()
        parts = urlsplit(base)
        if parts.scheme != "http":
            raise UpstreamError(f"only http:// pods are supported, got {base!r}")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, parts.hostname or "", parts.port or 80),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {base}: {exc!r}") from exc
        return conn

    async def post(
        self,
        base: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        while_waiting: Callable[[], object] | None = None,
    ) -> UpstreamResponse:
        """Send the request; the response's head once it came. ``while_waiting`` runs
        once the request is written, while the pod works on it (the router finishes
        its own bookkeeping there rather than before sending)."""
        host = base.split("://", 1)[-1]
        head = [f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        head.append("\r\n")
        payload = "".join(head).encode("latin-1") + body
        for attempt in range(2):
            conn = await self._get(base)
            try:
                conn.write(payload)
                if while_waiting is not None:
                    while_waiting()
                    while_waiting = None
                raw = await conn.readuntil(b"\r\n\r\n", MAX_HEAD)
            except (OSError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if conn.reused and attempt == 0:
                    continue  # a stale keep-alive connection: nothing was processed
                raise UpstreamError(f"{base}: no response: {exc!r}") from exc
            except BaseException:
                conn.close()
                raise
            return self._parse_head(raw, conn, base)
        raise UpstreamError(f"{base}: no response")  # unreachable: the loop returns or raises

    def _parse_head(self, raw: bytes, conn: _Conn, key: str) -> UpstreamResponse:
        lines = raw.decode("latin-1").split("\r\n")
        try:
            version, code = lines[0].split(" ", 2)[:2]
            status = int(code)
        except ValueError as exc:
            conn.close()
            raise UpstreamError(f"malformed status line {lines[0]!r}") from exc
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return UpstreamResponse(status, headers, conn, self, key, keep)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
