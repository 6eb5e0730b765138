"""The bytes of peer transfers: framing, runs of blocks, zero-copy paths (blocking: threads only).

A stream is one TCP connection (optionally TLS). After the token handshake the
puller sends one request per *run* of blocks and the peer answers::

    request  frame {"op": "fetch", "scope": str, "hashes": [bytes, ...]}
    answer   frame {"checksum": "xxh3" | "crc32c",
                    "blocks": [None | [size, checksum], ...]}   (one entry per hash, in order)
             then the payloads of the found blocks, back to back, raw

Frames are ``kvmarina.framing`` frames (length prefix + msgpack; never pickle).

Why this shape: one header per run instead of one per block, and no per-block
round trip, so a run streams at socket speed. On a plain socket the sender
``sendfile``s straight out of the pool's memfd (no user-space copy). The
receiver reads each block a chunk at a time into one reused buffer per
stream, hashes the chunk while it is in cache and ``pwrite``s it into the
leased slot's memfd (see ``_recv_block`` for why). Everything here runs in the
streams' threads: socket calls, pwrite and the checksums release the GIL, so streams
receive and checksum in parallel.

The checksum is the pool's ``migration.checksum`` (``agent/checksums.py``).

Invariant: a received block's bytes are only ever written into slots leased
for it, which nobody else can see until the caller verifies and commits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmarina.agent.memory import backed
from kvmarina.agent.node import checksums
from kvmarina.framing import HEADER, check_length, decode_body, encode_frame

MAX_HEADER = 1 << 20
_TIMEVAL = struct.Struct("@ll")  # struct timeval
CHUNK = 1 << 20  # receive buffer: each chunk is hashed while in cache, then stored


class TransferError(RuntimeError):
    """A transfer that cannot go on; the message says why and, where it can, what to do."""


class PeerClosed(ConnectionError):
    pass


@dataclass(frozen=True, slots=True)
class Span:
    """One block's bytes in the pool's memory.

    ``view``: a CPU view of them (None for device memory); ``fd``/``offset``:
    the memfd behind ``view`` when there is one (zero-copy I/O); ``tensor``: the
    device memory to fill when there is no CPU view; ``addr``: the address of
    ``view``, to ask whether its pages are backed already."""

    size: int
    view: memoryview | None = None
    fd: int | None = None
    offset: int = 0
    tensor: torch.Tensor | None = None
    addr: int = 0  # where ``view`` starts in this process (0: unknown)


_LIVE: weakref.WeakSet[Conn] = weakref.WeakSet()  # open streams, for abort_all


@dataclass(eq=False)
class Conn:
    """One stream; used by one thread at a time."""

    sock: socket.socket
    timeout: float
    _buffer: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        _LIVE.add(self)

    @property
    def plain(self) -> bool:
        return not isinstance(self.sock, ssl.SSLSocket)

    def buffer(self, size: int) -> memoryview:
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]

    def close(self) -> None:
        _LIVE.discard(self)
        self.sock.close()


def abort_all() -> None:
    """Shut every open stream down: a thread blocked on one returns at once (an
    agent stopping must not wait out the transfer timeout)."""
    for conn in list(_LIVE):
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------ frames


# Sockets are blocking with kernel timeouts (SO_RCVTIMEO / SO_SNDTIMEO): a call
# that waits longer fails with EAGAIN, which these helpers report as a stall.
# (A Python-level socket timeout would add a poll() before every recv.)
_STALLED = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _stalled(sock: socket.socket) -> TimeoutError:
    limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size)
    sec, usec = _TIMEVAL.unpack(limit)
    return TimeoutError(f"peer stalled for more than {sec + usec / 1e6:g}s")


def send_frame(sock: socket.socket, obj: Any) -> None:
    try:
        sock.sendall(encode_frame(obj, MAX_HEADER))
    except _STALLED:
        raise _stalled(sock) from None


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    # MSG_WAITALL: one system call per chunk on a plain socket (TLS takes no flags)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got, n = 0, len(view)
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got, flags)
        except _STALLED:
            raise _stalled(sock) from None
        if not k:
            raise PeerClosed(f"peer closed the stream after {got} of {n} bytes")
        got += k


def recv_frame(sock: socket.socket, max_size: int = MAX_HEADER) -> Any:
    head = bytearray(HEADER.size)
    recv_exact(sock, memoryview(head))
    (length,) = HEADER.unpack(head)
    check_length(length, max_size)
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    return decode_body(memoryview(body), max_size)


# ------------------------------------------------------------------ connections


def _setup(sock: socket.socket, timeout: float) -> None:
    """Blocking, with kernel timeouts; no Nagle delay (requests are tiny)."""
    sock.settimeout(None)
    limit = _TIMEVAL.pack(int(timeout), int(timeout % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wrap(
    sock: socket.socket, tls: ssl.SSLContext | None, server: bool, timeout: float
) -> socket.socket:
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_side=server)
    except _STALLED:
        raise TimeoutError(f"TLS handshake stalled for more than {timeout:g}s") from None
    finally:
        sock.close()  # detached by a successful wrap: closes nothing then


def dial(host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> Conn:
    sock = socket.create_connection((host, port), timeout)
    try:
        _setup(sock, timeout)
    except OSError:
        sock.close()
        raise
    return Conn(_wrap(sock, tls, False, timeout), timeout)


def accept(sock: socket.socket, tls: ssl.SSLContext | None, timeout: float) -> Conn:
    _setup(sock, timeout)
    return Conn(_wrap(sock, tls, True, timeout), timeout)


# ------------------------------------------------------------------ sending


def block_checksums(name: str, views: list[memoryview]) -> list[int]:
    fn = checksums.one_shot(name)
    return [fn(v) for v in views]


def send_run(conn: Conn, header: dict[str, Any], spans: list[Span]) -> None:
    """The answer to one fetch: header frame, then every found block's bytes."""
    send_frame(conn.sock, header)
    for span in spans:
        if conn.plain and span.fd is not None:
            _sendfile(conn, span.fd, span.offset, span.size)
        else:
            assert span.view is not None
            try:
                conn.sock.sendall(span.view)
            except _STALLED:
                raise _stalled(conn.sock) from None


def _sendfile(conn: Conn, fd: int, offset: int, n: int) -> None:
    sfd = conn.sock.fileno()
    while n:
        try:
            k = os.sendfile(sfd, fd, offset, n)
        except BlockingIOError:
            raise _stalled(conn.sock) from None
        if k == 0:
            raise TransferError("a block's memory ended before its announced size")
        offset += k
        n -= k


# ------------------------------------------------------------------ receiving


@dataclass
class RunResult:
    """Per requested hash: ``status`` is ``ok`` (landed and verified), ``missing``
    (the peer has no such block), ``corrupt`` (checksum mismatch) or ``""`` (not
    received: the stream broke first, see ``error``). ``target[i]`` is the index
    of the leased span hash ``i`` landed in (-1 if none)."""

    status: list[str]
    checksums: list[int]
    target: list[int]
    nbytes: int = 0
    error: str | None = None


def receive_run(
    conn: Conn,
    scope: str,
    hashes: list[bytes],
    spans: list[Span],
    block_bytes: int,
    checksum: str = "xxh3",
) -> RunResult:
    """Fetch one run into ``spans`` (leased, one per hash), verifying each block
    with the ``checksum`` algorithm. Never raises for the stream's faults:
    blocks verified before a fault stay usable."""
    n = len(hashes)
    res = RunResult([""] * n, [0] * n, [-1] * n)
    try:
        send_frame(conn.sock, {"op": "fetch", "scope": scope, "hashes": hashes})
        entries = _run_header(recv_frame(conn.sock), n, checksum)
        used = 0
        for i, entry in enumerate(entries):
            if entry is None:
                res.status[i] = "missing"
                continue
            size, want = entry
            if size != block_bytes:
                raise TransferError(
                    f"peer block of {size} bytes, this session's are {block_bytes}: "
                    "a different model layout"
                )
            got = _recv_block(conn, spans[used], size, checksum)
            res.target[i], used = used, used + 1
            res.nbytes += size
            res.status[i], res.checksums[i] = ("ok" if got == want else "corrupt"), want
    except (OSError, TransferError, ValueError) as exc:  # FrameError is a ValueError
        res.error = str(exc) or type(exc).__name__
    return res


def _run_header(head: Any, n: int, checksum: str) -> list[tuple[int, int] | None]:
    if isinstance(head, dict) and head.get("ok") is False:
        raise TransferError(f"peer refused the fetch: {head.get('error')}")
    theirs = head.get("checksum", "xxh3") if isinstance(head, dict) else None
    if theirs != checksum:
        raise TransferError(
            f"peer checksums blocks with {theirs!r}, this agent with {checksum!r}: "
            "the pool's agents must share one migration.checksum"
        )
    entries = head.get("blocks") if isinstance(head, dict) else None
    if not isinstance(entries, list) or len(entries) != n:
        raise TransferError("peer's run header does not match the request")
    out: list[tuple[int, int] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
        elif (
            isinstance(e, list)
            and len(e) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e)
        ):
            out.append((e[0], e[1]))
        else:
            raise TransferError(f"peer's run header has a malformed entry {e!r}")
    return out


def _recv_block(conn: Conn, span: Span, size: int, checksum: str) -> int:
    """Land ``size`` payload bytes in ``span``; their ``checksum``.

    A chunk at a time, each hashed while it is still in cache. Where the
    span's pages are backed already (a page this scope used before: the pool
    keeps a freed page's memory for its scope), the socket is read straight
    into them. Otherwise each chunk goes through the stream's buffer and into
    the memfd with ``pwrite``: the kernel fills fresh shared pages directly,
    where writing through the mapping would take a page fault and a zero-fill
    per 4 KiB page (measured here at ~0.8 GB/s against ~2.4 GB/s for pwrite,
    and 3.7 GB/s for pwrite against 7.9 GB/s for a copy into backed pages).

    Limits, measured on a 2-core VM: allocating fresh shared pages is most of
    a first pull's receiving cost, and pwrites into one memfd serialize on
    its inode lock, so streams beyond about four add no receive bandwidth
    into one scope's region."""
    digest = checksums.streaming(checksum)
    direct = span.view if span.view is not None and span.addr and backed(span.addr, size) else None
    done = 0
    while done < size:
        n = min(size - done, CHUNK)
        if direct is not None:
            buf = direct[done : done + n]
            recv_exact(conn.sock, buf)
        else:
            buf = conn.buffer(n)
            recv_exact(conn.sock, buf)
            _store(span, done, buf)
        digest.update(buf)
        done += n
    return digest.intdigest()


def _store(span: Span, at: int, buf: memoryview) -> None:
    if span.fd is not None:
        _pwrite(span.fd, buf, span.offset + at)
    elif span.view is not None:
        span.view[at : at + len(buf)] = buf
    else:
        assert span.tensor is not None
        span.tensor[at : at + len(buf)].copy_(torch.frombuffer(buf, dtype=torch.uint8))


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        k = os.pwrite(fd, data, offset)
        data, offset = data[k:], offset + k
