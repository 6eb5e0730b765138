"""The serving side of peer transfers: accept, authenticate, answer each fetch with a run.

The event loop accepts connections and waits for each next request (an idle
stream holds no thread); socket reads and writes, the TLS and token
handshakes, and checksums of blocks that have none yet run in the transfer
service's threads. Pool state (index lookups, pins, cached checksums) is only
touched on the loop.

Invariant: a block listed in a run's header stays pinned (never evicted, its
slot never reused) until the same stream sends its next request or ends, by
which time the receiver has read the whole run, zero-copy pages included.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from kvmarina.agent.node.index import Block
from kvmarina.agent.node.pool import Location, Pool
from kvmarina.agent.transfer.auth import server_handshake
from kvmarina.agent.transfer.wire import (
    Conn,
    PeerClosed,
    Span,
    TransferError,
    accept,
    block_checksums,
    recv_frame,
    send_frame,
    send_run,
)

log = logging.getLogger(__name__)
MAX_RUN = 1 << 16  # hashes per fetch request
IO = Callable[..., Awaitable[Any]]


class Server:
    """Answers peers' fetches from ``pool``; ``io(fn, *args)`` runs ``fn`` in a worker thread."""

    def __init__(
        self, pool: Pool, token: bytes, timeout: float, tls: ssl.SSLContext | None, io: IO
    ) -> None:
        self.pool, self.token, self.timeout, self.tls, self._io = pool, token, timeout, tls, io
        self.port = 0
        self.refused = 0
        self._lsock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lsock = socket.create_server((host, port), family=family, backlog=128)
        lsock.setblocking(False)
        self._lsock, self.port = lsock, lsock.getsockname()[1]
        self._spawn(self._accept_loop(lsock))

    async def stop(self) -> None:
        if self._lsock is not None:
            self._lsock.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                raw, addr = await loop.sock_accept(lsock)
            except OSError as exc:  # out of file descriptors, say: keep serving
                log.warning("transfer service cannot accept: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._serve(raw, addr))

    async def _admit(self, raw: socket.socket, addr: Any) -> Conn | None:
        """The authenticated stream, or None (logged and counted) for any other peer."""
        conn: Conn | None = None
        try:
            conn = await self._io(accept, raw, self.tls, self.timeout)
            if await self._io(server_handshake, conn.sock, self.token):
                return conn
            why = "wrong transfer token"
        except (OSError, ValueError) as exc:  # TLS refusals are OSErrors, frames ValueErrors
            why = str(exc) or type(exc).__name__
        self.refused += 1
        log.warning("refused an unauthenticated transfer peer %s: %s", addr, why)
        (conn.close() if conn is not None else raw.close())
        return None

    async def _readable(self, conn: Conn) -> bool:
        """Wait on the loop (no thread held) until the stream has bytes or EOF."""
        if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            return True
        loop, fd = asyncio.get_running_loop(), conn.sock.fileno()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, self.timeout)
            return True
        except TimeoutError:
            return False  # an idle stream: closed, the puller reconnects
        finally:
            loop.remove_reader(fd)

    async def _serve(self, raw: socket.socket, addr: Any) -> None:
        conn = await self._admit(raw, addr)
        if conn is None:
            return
        pinned: list[Block] = []
        try:
            while await self._readable(conn):
                req = await self._io(recv_frame, conn.sock)
                self._unpin(pinned)  # the receiver has read the previous run whole
                checked = _check_fetch(req)
                if isinstance(checked, str):
                    await self._io(send_frame, conn.sock, {"ok": False, "error": checked})
                    return
                header, spans = await self._plan(*checked, pinned)
                await self._io(send_run, conn, header, spans)
        except PeerClosed:
            pass
        except (OSError, ValueError, TransferError) as exc:
            log.info("transfer peer %s: %s", addr, exc)
        finally:
            self._unpin(pinned)
            conn.close()

    def _unpin(self, pinned: list[Block]) -> None:
        for block in pinned:
            self.pool.index.unpin(block)
        pinned.clear()

    async def _plan(
        self, scope: str, hashes: list[bytes], pinned: list[Block]
    ) -> tuple[dict[str, Any], list[Span]]:
        """Pin the found blocks (into ``pinned``); the run's header and sources."""
        found: list[Block | None] = []
        for h in hashes:
            block = self.pool.index.get((scope, h))
            if block is not None:
                self.pool.index.pin(block)
                pinned.append(block)
            found.append(block)
        spans = [self._span(b) for b in pinned]
        todo = [k for k, b in enumerate(pinned) if b.checksum is None]
        if todo:  # first send of these blocks: hash them off the loop
            where = [(pinned[k].tier, pinned[k].slot) for k in todo]
            sums = await self._io(
                block_checksums, self.pool.checksum_name, [spans[k].view for k in todo]
            )
            for k, was, digest in zip(todo, where, sums, strict=True):
                block = pinned[k]
                if (block.tier, block.slot) != was:  # promoted meanwhile: hash where it is now
                    spans[k] = self._span(block)
                    self.pool.checksum(block)
                elif block.checksum is None:
                    block.checksum = digest
        entries = [None if b is None else [b.block_bytes, b.checksum] for b in found]
        return {"checksum": self.pool.checksum_name, "blocks": entries}, spans

    def _span(self, block: Block) -> Span:
        scope, h = block.key
        region = self.pool.region(scope) if block.tier == "device" else self.pool.host_region
        view = self.pool.host_view(block)  # on a GPU: a copy out of device memory
        if region is None or region.kind != "cpu":
            return Span(block.block_bytes, view)
        loc = Location(h, block.slot.page, block.slot.index, block.tier)
        return Span(
            block.block_bytes, view, region.fd, loc.offset(self.pool.page_size, block.block_bytes)
        )


def _check_fetch(req: Any) -> tuple[str, list[bytes]] | str:
    """(scope, hashes) of a well-formed fetch, else what was wrong with it."""
    if not isinstance(req, dict) or req.get("op") != "fetch":
        return "expected a fetch request"
    scope, hashes = req.get("scope", ""), req.get("hashes")
    if not isinstance(scope, str):
        return "scope must be a string"
    if not isinstance(hashes, list) or len(hashes) > MAX_RUN:
        return f"hashes must be a list of at most {MAX_RUN} hashes"
    if not all(isinstance(h, bytes) for h in hashes):
        return "every hash must be bytes"
    return scope, hashes
