"""The agent-backed store of ``kvmarina.Cache``: values as blocks in the node's pool.

Every process on the node that opens a cache with a token of the same sharing
scope and the same cache namespace sees the same values. Bytes never travel
through the agent's socket: a writer copies the tensor straight into leased
slots of the shared region it mapped; a reader maps the value's blocks into one
private range of its own (``view``: no copy, copy-on-write if the caller
writes) and keeps its chunks pinned until the tensor it got is freed. Values of
one block, and pools whose memory cannot be mapped so (CUDA), are copied out
instead. Layout and hashes: ``format``.

Capacity is the session's budget: ``max_blocks = capacity // block_bytes``, held
per serving by the agent like an engine's. The session registers ``evict_own``
with the cache's policy, so a put past the max makes the *agent* drop this
serving's own unpinned blocks, least recently used (or least frequently) first;
node-wide pressure evicts by the agent's own policy, within budgets, as for
engines. A value's head is released before its chunks, so in either order a value
leaves head first: gone at once (a miss), its leftover chunks the next victims.
A value with any block missing is a miss, and the reader drops what is left.

Consistency: a put writes new-generation chunks, then replaces the head in one
agent step; a reader pins the head, then that generation's chunks, so it reads
the old value or the new one, never a mix. Replacing a head a reader pins waits
(``Busy``) until the reader lets go (a get holds it only while it maps), up to
``busy_timeout_s``; chunks of a replaced value still held by a reader's tensor
stay until it is freed, unreachable, and are evicted like any unpinned block.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kvmarina.agent.cache import format as fmt
from kvmarina.agent.cache.view import ViewError, map_value
from kvmarina.agent.client.connection import (
    AgentBusy,
    AgentClient,
    AgentError,
    AgentFull,
    AgentUnavailable,
    Budget,
)
from kvmarina.agent.client.hits import Hit

log = logging.getLogger(__name__)
T = TypeVar("T")
HUGE = 2 << 20  # fresh outputs from here up are mapped with huge pages (fewer faults)
DEFAULT_CHUNK = 64 * 1024
MIN_CHUNK = 4096  # room for the largest header


class StoreError(ValueError):
    """A put the agent store cannot take; the message says what to do."""


class AgentStore:
    name = "agent"

    def __init__(
        self,
        client: AgentClient,
        namespace: str,
        capacity: int,
        busy_timeout_s: float = 10.0,
    ) -> None:
        self.client, self.bb = client, client.block_bytes
        self.max_blocks = capacity // self.bb
        self.size = int(client.info.get("digest_bytes", 16))
        tag = fmt.namespace_tag(namespace)
        self.head_tag, self.chunk_tag = tag + b"h", tag + b"c"
        self.busy_timeout_s = busy_timeout_s
        assert client.region is not None
        self.region: torch.Tensor = client.region
        # chunk pins of mapped values whose tensors were freed (queued by the garbage
        # collector, released by the next call: never from inside another call)
        self._unpin_later: list[list[bytes]] = []
        self._views: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        self._orphans: list[bytes] = []  # blocks of replaced values a reader still held

    # ------------------------------------------------------------ helpers

    def _head(self, digest: bytes) -> bytes:
        return fmt.block_hash(b"head", digest, self.size)

    def _off(self, hit: Hit | tuple[int, int]) -> int:
        return (
            self.client.offset(hit[1], hit[2]) if isinstance(hit, Hit) else self.client.offset(*hit)
        )

    def _read(self, off: int, n: int) -> bytes:
        return self.region[off : off + n].cpu().numpy().tobytes()

    def _retry_busy(self, fn: Callable[[], T], what: str) -> T:
        """``fn`` until no reader pins what it changes (backing off), or time is up."""
        deadline, pause = time.monotonic() + self.busy_timeout_s, 0.0002
        while True:
            try:
                return fn()
            except AgentBusy:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{what}: other processes kept reading this key for "
                        f"{self.busy_timeout_s:g}s; retry later"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)

    def _drop_all(self, hashes: list[bytes]) -> None:
        """Drop blocks of an old or broken value. Pinned ones (a reader's tensor still
        maps them) stay, unreachable: retried by later calls, evicted if this
        process goes first."""
        if hashes:
            _, busy, _ = self.client.drop(hashes)
            self._orphans.extend(busy)

    def _flush(self) -> None:
        """Release the chunk pins of mapped values freed since; retry dropping the
        leftovers of replaced values (one request, while a reader holds some)."""
        while self._unpin_later:
            hashes = self._unpin_later.pop()
            try:
                self.client.release(hashes)
            except AgentError as exc:  # the session is gone: its pins went with it
                log.debug("releasing a freed value's pins failed: %s", exc)
        if self._orphans:
            orphans, self._orphans = self._orphans, []
            self._orphans = self.client.drop(orphans)[1]

    # ------------------------------------------------------------ get

    def get(self, digest: bytes) -> torch.Tensor | None:
        self._flush()
        head = self._head(digest)
        hits = self.client.lookup([head])
        if not hits:
            return None
        pinned = [head]
        try:
            off = self._off(hits[0])
            try:
                hdr = fmt.parse(self._read(off, fmt.data_offset(fmt.MAX_DIMS)), digest, self.bb)
            except fmt.FormatError as exc:
                log.warning("ignoring a broken cache value: %s", exc)
                return None
            chunks = hdr.chunk_hashes(self.size)
            found = self.client.lookup(chunks) if chunks else []
            pinned += chunks[: len(found)]
            if len(found) < len(chunks):  # partly evicted: a miss, and clear the rest
                self.client.release(pinned)
                pinned = []
                self._drop_all([head, *chunks[: len(found)]])
                return None
            offsets = [off, *map(self._off, found)]
            if chunks and self.client.region_fd is not None:
                view = self._map(hdr, offsets, chunks)
                if view is not None:
                    pinned = [head]  # the chunks stay pinned while the tensor lives
                    return view
            return self._copy_out(hdr, offsets)
        finally:
            if pinned:
                self.client.release(pinned)  # head first: it leaves the order first

    def _map(self, hdr: fmt.Header, offsets: list[int], chunks: list[bytes]) -> torch.Tensor | None:
        fd = self.client.region_fd
        assert fd is not None
        later = self._unpin_later
        try:
            flat, mm = map_value(
                fd, offsets, self.bb, hdr.data_offset, hdr.nbytes, lambda: later.append(chunks)
            )
        except ViewError as exc:
            log.debug("copying a value out instead of mapping it: %s", exc)
            return None
        self._views.add(mm)
        return flat.view(hdr.dtype).reshape(hdr.shape)

    def _copy_out(self, hdr: fmt.Header, offsets: list[int]) -> torch.Tensor:
        out = _fresh(hdr.nbytes, self.region.device)
        for src, dst, n in fmt.segments(offsets, hdr.data_offset, hdr.nbytes, self.bb):
            out[dst : dst + n].copy_(self.region[src : src + n])
        return out.view(hdr.dtype).reshape(hdr.shape)

    # ------------------------------------------------------------ put

    def put(self, digest: bytes, value: torch.Tensor) -> int:
        """Store ``value``; returns 0 (evictions are the agent's: see ``evictions``)."""
        self._flush()
        flat = value.detach().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        if value.dim() > fmt.MAX_DIMS:
            raise StoreError(f"a tensor of {value.dim()} dimensions; at most {fmt.MAX_DIMS}")
        n = fmt.blocks_needed(nbytes, value.dim(), self.bb)
        if n > self.max_blocks:
            raise StoreError(
                f"a tensor of {nbytes} bytes takes {n} blocks of {self.bb} bytes with its "
                f"header; this cache holds {self.max_blocks}: raise capacity"
            )
        head = self._head(digest)
        hdr = fmt.Header(digest, os.urandom(8), value.dtype, tuple(value.shape), nbytes, n)
        slots, stale = self._lease(n, head, digest)
        try:
            self._write(hdr, flat, slots)
            chunks = hdr.chunk_hashes(self.size)
            if chunks:
                self.client.commit(
                    [(p, i, h) for (p, i), h in zip(slots[1:], chunks, strict=True)], self.chunk_tag
                )
        except BaseException:
            self.client.release([], slots)
            raise
        try:
            _, old = self._retry_busy(
                lambda: self.client.replace((*slots[0], head), self.head_tag, fmt.FIXED_BYTES),
                "overwriting a key",
            )
        except BaseException:
            self.client.release(chunks, [slots[0]])
            self._drop_all(chunks)
            raise
        self.client.release([head, *chunks])
        # the replaced generation's chunks (or, if the agent dropped that head to
        # make room, whatever is left of the generation probed before leasing)
        self._drop_all(list(dict.fromkeys(stale + (self._old_chunks(digest, old) if old else []))))
        return 0

    def _lease(
        self, n: int, head: bytes, digest: bytes
    ) -> tuple[list[tuple[int, int]], list[bytes]]:
        """``n`` slots, and the chunks of the value the put replaces: at the max, the
        agent drops that old value first (``prefer``) rather than another key's."""
        count, raw = self.client.probe([head], peek=fmt.FIXED_BYTES)
        stale = self._old_chunks(digest, raw) if count and raw else []
        try:
            return self.client.lease(n, [head, *stale]), stale
        except AgentFull as exc:
            raise StoreError(f"the agent has no room for {n} blocks now: {exc}") from None

    def _old_chunks(self, digest: bytes, raw: bytes) -> list[bytes]:
        try:
            found, gen, nbytes, n_blocks = fmt.parse_fixed(raw)
        except fmt.FormatError:
            return []
        if found != digest:
            return []
        hdr = fmt.Header(digest, gen, torch.uint8, (nbytes,), nbytes, n_blocks)
        return hdr.chunk_hashes(self.size)

    def _write(self, hdr: fmt.Header, flat: torch.Tensor, slots: list[tuple[int, int]]) -> None:
        offsets = [self._off(s) for s in slots]
        packed = hdr.pack()
        self.region[offsets[0] : offsets[0] + len(packed)].copy_(
            torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        )
        src = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        for dst, pos, n in fmt.segments(offsets, hdr.data_offset, hdr.nbytes, self.bb):
            self.region[dst : dst + n].copy_(src[pos : pos + n])

    # ------------------------------------------------------------ the rest

    def delete(self, digest: bytes) -> bool:
        self._flush()
        head = self._head(digest)
        removed, _, peeked = self._retry_busy(
            lambda: _drop_or_busy(self.client, head), "deleting a key"
        )
        if removed and peeked[0]:
            self._drop_all(self._old_chunks(digest, peeked[0]))
        return bool(removed)

    def contains(self, digest: bytes) -> bool:
        """Present and complete, checked without pinning (no use is counted)."""
        count, raw = self.client.probe([self._head(digest)], peek=fmt.FIXED_BYTES)
        if not count or not raw:
            return False
        chunks = self._old_chunks(digest, raw)
        return not chunks or self.client.probe(chunks)[0] == len(chunks)

    def __len__(self) -> int:
        return int(self.client.count([self.head_tag])[0][0])

    def used_bytes(self) -> int:
        counts = self.client.count([self.head_tag, self.chunk_tag])
        return (counts[0][0] + counts[1][0]) * self.bb

    def evictions(self) -> int:
        """Values of this namespace the agent evicted since it started (any process)."""
        return int(self.client.count([self.head_tag])[0][1])

    def close(self) -> None:
        # tensors still mapping shared pages would read whatever the agent puts there
        # once this session's pins are gone: give them private copies first
        for mm in list(self._views):
            with memoryview(mm) as buf:
                buf[:] = bytes(buf)
        self._views.clear()
        self._unpin_later.clear()
        self.client.close()


def _drop_or_busy(
    client: AgentClient, head: bytes
) -> tuple[list[bytes], list[bytes], list[bytes | None]]:
    removed, busy, peeked = client.drop([head], peek=fmt.FIXED_BYTES)
    if busy:
        raise AgentBusy("the head is pinned")
    return removed, busy, peeked


def _fresh(nbytes: int, device: torch.device) -> torch.Tensor:
    """An uninitialised uint8 tensor. Large CPU ones are mapped with transparent huge
    pages: first-touch faults, not the copy, dominate a cold 64 MiB allocation."""
    if device.type != "cpu" or nbytes < HUGE:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive


def open_store(cache: Any, agent: str, token: str | None, chunk_bytes: int | None) -> AgentStore:
    """The agent store for a ``Cache`` (its capacity, policy and namespace); every
    failure to get one is a ``StoreError`` that says what to do."""
    if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes < MIN_CHUNK):
        raise StoreError(f"chunk_bytes must be an integer >= {MIN_CHUNK}, got {chunk_bytes!r}")
    tok = token or _token_from_env()
    try:
        client = _connect(agent, tok, cache.capacity, cache.policy, chunk_bytes)
    except AgentUnavailable as exc:
        raise StoreError(f"{exc} (or omit agent= to cache in this process)") from None
    except AgentError as exc:
        raise StoreError(f"the agent at {agent} refused the cache: {exc}") from None
    if cache.capacity < client.block_bytes:
        client.close()
        raise StoreError(
            f"capacity {cache.capacity} is below one block of {client.block_bytes} bytes; "
            "raise capacity or lower chunk_bytes"
        )
    log.info("kvmarina.Cache %r: values live in the agent's pool at %s", cache.namespace, agent)
    return AgentStore(client, cache.namespace, cache.capacity)


def _token_from_env() -> str:
    token = os.environ.get("KVMARINA_AGENT_TOKEN")
    path = os.environ.get("KVMARINA_CREDENTIAL_FILE")
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise StoreError(f"cannot read the credential file {path}: {exc.strerror}") from None
    if not token:
        raise StoreError(
            "Cache(agent=...) needs a serving token to register: pass token=, or set "
            "KVMARINA_AGENT_TOKEN or KVMARINA_CREDENTIAL_FILE"
        )
    return token


def _connect(
    socket_path: str, token: str, capacity: int, policy: str, chunk_bytes: int | None
) -> AgentClient:
    """Register a session whose budget is the capacity; chunks default to 64 KiB, or
    the agent's page size when its pages are smaller."""
    want = chunk_bytes or DEFAULT_CHUNK
    for attempt in range(2):
        budget = Budget(0, max(1, capacity // want))
        try:
            return AgentClient(socket_path, token, want, budget, evict_own=policy).connect()
        except AgentUnavailable:
            raise
        except AgentError as exc:
            page = getattr(exc, "page_size", None)
            if attempt or chunk_bytes or not isinstance(page, int) or want <= page:
                raise
            want = page
    raise AssertionError("unreachable")
