"""An engine's connection to its node agent: register, lease, commit, lookup, release, map.

``AgentClient`` talks to a running agent over its unix socket (blocking calls,
safe from any one thread at a time: the engine's scheduler thread).

The scope region arrives once, as a file descriptor on the ``register`` reply
(shared RAM is mmapped; CUDA memory is imported with the driver's VMM API);
afterwards everything is (page, index) slots: ``block(page, index)`` is a
zero-copy view of a block's bytes in the mapped region.

Under pressure the agent may push ``reclaim`` requests on the same connection;
``watch(on_reclaim)`` has them handled (see there). Without a handler they are
ignored, and the agent, after a bounded wait, takes nothing that is not released.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvmarina.agent.client.hits import Hit, Hits
from kvmarina.framing import HEADER, FrameDecoder, encode_frame

log = logging.getLogger(__name__)
# Bytes asked of one recv(). Ask 128 KiB or more and glibc maps a fresh buffer for
# every call (~20-30 us, a third of a ping's round trip); most replies fit in 64 KiB,
# and a longer one takes several reads.
RECV_BYTES = 1 << 16


class AgentError(RuntimeError):
    """The agent refused a request; the message is the agent's."""


class AgentFull(AgentError):
    """No KV room right now (budgets or every block in use): wait and retry."""


class AgentBusy(AgentError):
    """A block to replace or drop is pinned by a reader right now: retry shortly."""


class AgentUnavailable(AgentError):
    """The agent is not there or went away (e.g. restarted): reconnect and re-register."""


@dataclass(frozen=True, slots=True)
class Budget:
    min_blocks: int = 0
    max_blocks: int = 1 << 40
    priority: int = 100

    def wire(self) -> dict[str, int]:
        return {
            "min_blocks": self.min_blocks,
            "max_blocks": self.max_blocks,
            "priority": self.priority,
        }


class RegionBlocks:
    """Blocks as views of a mapped region: ``(page, index)`` -> bytes, no copy."""

    info: dict[str, Any]
    block_bytes: int
    region: torch.Tensor | None

    @property
    def page_size(self) -> int:
        return int(self.info["page_size"])

    def offset(self, page: int, index: int) -> int:
        return page * self.page_size + index * self.block_bytes

    def block(self, page: int, index: int) -> torch.Tensor:
        """The block's bytes in the region (a view: no copy)."""
        assert self.region is not None, "connect() first"
        off = self.offset(page, index)
        return self.region[off : off + self.block_bytes]


class AgentClient(RegionBlocks):
    def __init__(
        self,
        socket_path: str,
        token: str,
        block_bytes: int,
        budget: Budget | None = None,
        timeout: float = 30.0,
        evict_own: str = "",
        pod: str = "",
    ) -> None:
        """``evict_own`` ("lru" | "lfu"): leases past the budget's max drop this
        serving's own unpinned blocks in that order instead of failing (caches).
        ``pod``: the engine's pod name, which its load reports carry (``report_load``)."""
        self.socket_path, self.token, self.block_bytes = socket_path, token, block_bytes
        self.evict_own, self.pod = evict_own, pod
        self.budget, self.timeout = budget or Budget(), timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._dec = FrameDecoder()
        self.region: torch.Tensor | None = None
        self.region_fd: int | None = None
        self._mm: Any = None
        self.info: dict[str, Any] = {}
        self._pushes: list[dict[str, Any]] = []
        self._on_reclaim: Callable[[int], None] | None = None
        self._watcher: threading.Thread | None = None
        self.reclaim_requests = 0

    # ------------------------------------------------------------ connection

    def connect(self) -> AgentClient:
        if not os.path.exists(self.socket_path):
            raise AgentUnavailable(
                f"no agent socket at {self.socket_path}: is `kvmarina agent` running on this node?"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        self._dec = FrameDecoder()  # a reconnect starts a fresh stream
        try:
            sock.connect(self.socket_path)
            sock.sendall(
                encode_frame(
                    {
                        "op": "register",
                        "token": self.token,
                        "block_bytes": self.block_bytes,
                        "budget": self.budget.wire(),
                        **({"evict_own": self.evict_own} if self.evict_own else {}),
                        **({"pod": self.pod} if self.pod else {}),
                    }
                )
            )
            reply, fds = self._recv_with_fds(sock)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot reach the agent at {self.socket_path}: {exc}") from exc
        if not reply.get("ok"):
            sock.close()
            for fd in fds:
                os.close(fd)
            err = AgentError(str(reply.get("error", "registration refused")))
            err.page_size = reply.get("page_size")  # type: ignore[attr-defined]
            raise err
        if not fds:
            sock.close()
            raise AgentError("the agent sent no memory region with its reply")
        self._sock, self.info = sock, reply
        self._map(fds[0], int(reply["region_size"]), str(reply.get("backend", "cpu")))
        return self

    def _recv_with_fds(self, sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        buf = b""
        need = HEADER.size
        while len(buf) < need:
            data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(16))
            if not data:
                raise OSError("the agent closed the connection")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            buf += data
            if len(buf) >= HEADER.size:
                need = HEADER.size + HEADER.unpack_from(buf)[0]
        self._dec.feed(buf)
        return next(iter(self._dec.frames())), fds

    def _map(self, fd: int, size: int, backend: str) -> None:
        if backend == "cuda":
            from kvmarina.agent.memory import CudaMapping, RegionError

            try:
                self._mm = CudaMapping(fd, size, int(self.info.get("device", 0)))
            except RegionError as exc:
                raise AgentError(f"cannot map the agent's CUDA region: {exc}") from exc
            finally:
                os.close(fd)  # the driver holds its own reference once imported
            self.region = self._mm.tensor()
            return
        if backend != "cpu":
            os.close(fd)
            raise AgentError(f"the agent offered a {backend!r} region; this client maps cpu/cuda")
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # kept for private mappings of single values (kvmarina.Cache reads)
        if self.region_fd is not None:
            os.close(self.region_fd)
        self.region_fd = fd
        self.region = torch.frombuffer(self._mm, dtype=torch.uint8)

    def close(self) -> None:
        self._on_reclaim = None  # stops the watcher thread
        self._watcher = None
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self.region_fd is not None:
                os.close(self.region_fd)
                self.region_fd = None

    # ------------------------------------------------------------ requests

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._sock is None:
                raise AgentUnavailable("not connected to the agent")
            try:
                self._sock.sendall(encode_frame(msg))
                reply = self._next_reply(self._sock)
            except OSError as exc:
                self._sock.close()
                self._sock = None
                raise AgentUnavailable(f"lost the agent: {exc}") from exc
        if self._pushes:
            self._run_pushes()
        if not reply.get("ok"):
            code = reply.get("code")
            cls = AgentFull if code == "full" else AgentBusy if code == "busy" else AgentError
            raise cls(str(reply.get("error")))
        return reply

    def _next_reply(self, sock: socket.socket) -> dict[str, Any]:
        """The next reply frame; requests the agent pushed meanwhile are queued."""
        while True:
            for frame in self._dec.frames():
                if isinstance(frame, dict) and "push" in frame:
                    self._pushes.append(frame)
                else:
                    return frame  # type: ignore[no-any-return]
            data = sock.recv(RECV_BYTES)
            if not data:
                raise OSError("the agent closed the connection")
            self._dec.feed(data)

    # ------------------------------------------------------------ reclaim requests

    def watch(
        self, on_reclaim: Callable[[int], None], interval: float = 0.05, background: bool = True
    ) -> None:
        """Handle the agent's reclaim requests: ``on_reclaim(n)`` is asked to release
        about ``n`` cold blocks (unpin cached prefixes, return unused leases).

        Requests arriving during a call run right after it, on the caller's thread;
        while the client is idle, a daemon thread (``background``) notices them and
        runs the handler there, so the handler must be thread-safe. Without the
        thread, an engine's own loop calls ``poll()``. The agent waits a bounded
        time (its ``reclaim_timeout_s``) and never takes blocks not released.
        """
        self._on_reclaim = on_reclaim
        if background and self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_loop, args=(interval,), name="kvmarina-agent-watch", daemon=True
            )
            self._watcher.start()

    def poll(self) -> int:
        """Read and handle pushed requests without blocking; returns how many ran."""
        with self._lock:
            sock = self._sock
            if sock is None:
                return 0
            try:
                # select, not MSG_DONTWAIT: a socket with a timeout waits out the
                # timeout inside recv() whatever the flags say
                while select.select([sock], [], [], 0)[0]:
                    data = sock.recv(RECV_BYTES)
                    if not data:
                        break  # EOF: the next call reports the agent gone
                    self._dec.feed(data)
            except (OSError, ValueError):
                return 0
            for frame in self._dec.frames():
                if isinstance(frame, dict) and "push" in frame:
                    self._pushes.append(frame)
        return self._run_pushes()

    def _watch_loop(self, interval: float) -> None:
        while self._on_reclaim is not None:
            sock = self._sock
            if sock is None:
                time.sleep(interval)
                continue
            try:
                readable, _, _ = select.select([sock], [], [], interval)
            except (OSError, ValueError):  # closed under us: pick up the new socket
                time.sleep(interval)
                continue
            # A call in flight consumes its own reply under the lock; poll() then
            # finds only pushed requests, or nothing (or EOF: back off, the next
            # call reports the agent gone).
            if readable and not self.poll():
                time.sleep(interval)

    def _run_pushes(self) -> int:
        pushes, self._pushes = self._pushes, []
        handler = self._on_reclaim
        for push in pushes:
            if push.get("push") == "reclaim" and handler is not None:
                self.reclaim_requests += 1
                try:
                    handler(int(push.get("n", 0)))
                except Exception:  # the engine's handler failing must not break the client
                    log.exception("reclaim handler failed")
        return len(pushes)

    def lease(self, n: int, prefer: list[bytes] | None = None) -> list[tuple[int, int]]:
        msg: dict[str, Any] = {"op": "lease", "n": n}
        if prefer:
            msg["prefer"] = prefer
        return [(p, i) for p, i in self._call(msg)["slots"]]

    def commit(self, items: list[tuple[int, int, bytes]], tag: bytes = b"") -> list[Hit]:
        msg: dict[str, Any] = {"op": "commit", "items": [[p, i, h] for p, i, h in items]}
        if tag:
            msg["tag"] = tag
        reply = self._call(msg)
        return [Hit(h, p, i, t) for h, p, i, t in reply["locations"]]

    def replace(
        self, item: tuple[int, int, bytes], tag: bytes = b"", peek: int = 0
    ) -> tuple[Hit, bytes | None]:
        """Commit one block in place of this serving's block of the same hash, in one
        step (``AgentBusy`` while a reader pins it). Returns the location and the first
        ``peek`` bytes of the block replaced (``None``: there was none)."""
        p, i, h = item
        reply = self._call(
            {"op": "commit", "items": [[p, i, h]], "tag": tag, "replace": True, "peek": peek}
        )
        (hh, pp, ii, t), old = reply["locations"][0], reply["replaced"][0]
        return Hit(hh, pp, ii, t), old

    def drop(
        self, hashes: list[bytes], peek: int = 0
    ) -> tuple[list[bytes], list[bytes], list[bytes | None]]:
        """Remove this serving's own blocks: (removed, busy (pinned: left), peeked)."""
        reply = self._call({"op": "drop", "hashes": list(hashes), "peek": peek})
        return reply["removed"], reply["busy"], reply["peeked"]

    def probe(self, hashes: list[bytes], peek: int = 0) -> tuple[int, bytes | None]:
        """How many of ``hashes`` are cached from the first, without pinning them."""
        reply = self._call({"op": "probe", "hashes": list(hashes), "peek": peek})
        return int(reply["n"]), reply["peek"]

    def count(self, tags: list[bytes]) -> list[tuple[int, int]]:
        """Per tag: (blocks of this scope carrying it, how many the agent evicted)."""
        reply = self._call({"op": "count", "tags": list(tags)})
        return list(zip(reply["blocks"], reply["evicted"], strict=True))

    def lookup(self, hashes: list[bytes]) -> Hits:
        """The longest cached run of ``hashes`` from the first, pinned until released."""
        return self.lookup_claim(hashes, claim=False)[0]

    def lookup_claim(self, hashes: list[bytes], claim: bool = True) -> tuple[Hits, int]:
        """``lookup``, and how many blocks after the hits another engine of the node
        is computing now; ``claim``: the blocks after those are this session's to
        compute (others then wait for them) until committed or given up
        (``release(unclaim=...)``)."""
        msg: dict[str, Any] = {"op": "lookup", "hashes": hashes}
        if claim:
            msg["claim"] = True
        reply = self._call(msg)
        pages, indices = array.array("I"), array.array("I")
        pages.frombytes(reply["pages"])
        indices.frombytes(reply["indices"])
        tiers = reply["tiers"]
        hits = Hits(hashes[: reply["n"]], pages, indices, tiers if b"h" in tiers else None)
        return hits, int(reply.get("pending", 0))

    def release(
        self,
        hashes: list[bytes],
        slots: list[tuple[int, int]] | None = None,
        unclaim: list[bytes] | None = None,
    ) -> None:
        msg: dict[str, Any] = {
            "op": "release",
            "hashes": list(hashes),
            "slots": [list(s) for s in slots or []],
        }
        if unclaim:
            msg["unclaim"] = list(unclaim)
        self._call(msg)

    def stats(self) -> dict[str, Any]:
        return self._call({"op": "stats"})

    def report_load(self, running: int, waiting: int) -> None:
        """The engine's load, for the node's routers (needs ``pod``)."""
        self._call({"op": "load", "running": running, "waiting": waiting})

    def ping(self) -> str:
        return str(self._call({"op": "ping"})["boot_id"])

    def pull(self, peer: str, hashes: list[bytes], node: str | None = None) -> dict[str, Any]:
        """Have the agent fetch ``hashes`` from ``peer`` (an agent URL, or the
        ``host:port`` of its transfer service) into this session's pool. The reply
        says how many were ``pulled`` and which were ``missing`` at the peer or
        ``failed`` (with ``error``); only verified blocks become visible."""
        msg: dict[str, Any] = {"op": "pull", "peer": peer, "hashes": list(hashes)}
        if node is not None:
            msg["node"] = node
        return self._call(msg)

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Any other operation, with the same error handling."""
        return self._call(msg)

    # ------------------------------------------------------------ memory
