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
from urllib.parse import urlsplit

READ_CHUNK = 65536
LAST_CHUNK = b"0\r\n\r\n"  # the empty chunk that ends a chunked body


class UpstreamError(OSError):
    """The pod could not be reached or sent a malformed response."""


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


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
        reader = self._conn.reader
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
        reader = self._conn.reader
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
                more = await self._conn.reader.read(READ_CHUNK)
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
            body = await self._conn.reader.readexactly(int(length))
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
        if len(idle) < self.max_idle and not conn.writer.is_closing():
            conn.reused = True
            idle.append(conn)
        else:
            conn.close()

    async def _get(self, base: str) -> _Conn:
        idle = self._idle[base]
        while idle:
            conn = idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.close()
        parts = urlsplit(base)
        if parts.scheme != "http":
            raise UpstreamError(f"only http:// pods are supported, got {base!r}")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port or 80, limit=1 << 20),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {base}: {exc!r}") from exc
        return _Conn(reader, writer)

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
                conn.writer.write(payload)
                if while_waiting is not None:
                    while_waiting()
                    while_waiting = None
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
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
