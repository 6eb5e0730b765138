"""Moving KV blocks between agents: authenticated, checksummed, all-or-nothing per block.

Pull-based. The agent that lacks blocks connects to the peer that has them and
asks for them by hash, over ``streams_per_peer`` concurrent streams that share
the hash list in runs of up to ``run_bytes`` (the wire format is in
``wire``, authentication in ``auth``). For each run the
receiver first leases slots, the stream's worker thread lands the payloads
straight in them and checksums them, and back on the event loop only verified
blocks are committed (visible, one ``stored`` event per run); the other slots
are released. A bad checksum drops that block; a short read, a timeout or a
refusal fails what was not yet verified; nothing partial is ever visible.

Threads: every blocking socket call runs in this service's thread pool; the
pool (index, leases, events) is only touched on the event loop. A sender pins
the blocks of a run until the receiver asks for the next run (or leaves), so
``sendfile``'s zero-copy pages are not reused under the stream. A pinned block
can still be promoted from the host tier by a local lookup while it is sent;
the receiver's checksum then catches the changed bytes and drops the block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmarina.agent.config import AgentConfig
from kvmarina.agent.node.index import Slot
from kvmarina.agent.node.pool import Location, Pool, PoolError, Session
from kvmarina.agent.transfer.auth import (
    TransferError,
    client_handshake,
    load_token,
    tls_contexts,
)
from kvmarina.agent.transfer.serve import Server
from kvmarina.agent.transfer.wire import Conn, RunResult, Span, abort_all, dial, receive_run

__all__ = [
    "TransferError",
    "TransferService",
    "load_token",
    "start_transfer_service",
    "tls_contexts",
]
log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_RUN = 4 << 20  # bytes: smaller pulls use fewer streams


@dataclass
class PeerStats:
    bytes: int = 0
    seconds: float = 0.0
    blocks: int = 0
    failed: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class _Pull:
    """One pull's shared state across its streams (all touched on the loop only)."""

    sess: Session
    peer: str
    host: str
    port: int
    runs: deque[list[bytes]]
    stats: PeerStats
    status: dict[bytes, str]
    errors: list[str]


class TransferService:
    """Serves blocks to peers and pulls blocks from them for local sessions.

    Invariant: ``_inflight`` maps (scope, hash) to the future of the one pull
    fetching it, so concurrent pulls of a block fetch it once.
    """

    def __init__(
        self,
        pool: Pool,
        token: bytes,
        node: str,
        timeout: float = 30.0,
        server_tls: Any = None,
        client_tls: Any = None,
        streams: int = 4,
        run_bytes: int = 32 << 20,
    ) -> None:
        self.pool, self.token, self.node, self.timeout = pool, token, node, timeout
        self.client_tls = client_tls
        self.streams, self.run_bytes = max(1, streams), max(1, run_bytes)
        self.peers: dict[str, PeerStats] = {}
        self.corrupt = 0
        self._inflight: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        self._ports: dict[str, tuple[str, int]] = {}  # agent URL -> its transfer address
        self._threads = ThreadPoolExecutor(32, thread_name_prefix="kvm-transfer")
        self.server = Server(pool, token, timeout, server_tls, self._io)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def refused(self) -> int:
        return self.server.refused

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def start(self, host: str, port: int) -> None:
        await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop()
        abort_all()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ pulling

    async def pull(self, sess: Session, msg: dict[str, Any]) -> dict[str, Any]:
        """The ``pull`` operation of the agent socket: fetch ``hashes`` from ``peer``."""
        peer, hashes = msg.get("peer"), msg.get("hashes")
        if not isinstance(peer, str) or not isinstance(hashes, list):
            return {"ok": False, "error": "pull needs peer (host:port or agent URL) and hashes"}
        if not all(isinstance(h, bytes) for h in hashes):
            return {"ok": False, "error": "hashes must be bytes"}
        todo, waits = [], []
        for h in hashes:
            key = (sess.scope, h)
            if self.pool.index.get(key) is not None:
                continue
            if key in self._inflight:
                waits.append(self._inflight[key])
            else:
                self._inflight[key] = asyncio.get_running_loop().create_future()
                todo.append(h)
        result: dict[str, Any] = {"pulled": [], "failed": list(todo), "missing": []}
        try:
            result = await self._fetch(sess, peer, todo)
        except (TransferError, OSError, ValueError, KeyError) as exc:
            result["error"] = str(exc)
        finally:
            pulled = set(result["pulled"])
            for h in todo:
                fut = self._inflight.pop((sess.scope, h), None)
                if fut is not None and not fut.done():
                    fut.set_result(h in pulled)
        shared = [await w for w in waits]
        return {
            "ok": True,
            "pulled": len(result["pulled"]) + sum(shared),
            "failed": result["failed"],
            "missing": result["missing"],
            **({"error": result["error"]} if "error" in result else {}),
        }

    async def _resolve(self, peer: str) -> tuple[str, int]:
        """``host:port`` of the transfer service, or an agent URL (asks its /stats
        once; forgotten when a pull from it reaches nothing)."""
        if peer in self._ports:
            return self._ports[peer]
        if peer.startswith(("http://", "https://")):
            import aiohttp

            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(
                        peer.rstrip("/") + "/stats",
                        timeout=aiohttp.ClientTimeout(total=self.timeout),
                    ) as r,
                ):
                    stats = await r.json()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise TransferError(f"cannot ask {peer} for its transfer port: {exc}") from None
            host = peer.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
            self._ports[peer] = host, int(stats["transfer"]["port"])
            return self._ports[peer]
        host, _, port = peer.rpartition(":")
        return host, int(port)

    async def _fetch(self, sess: Session, peer: str, hashes: list[bytes]) -> dict[str, Any]:
        if not hashes:
            return {"pulled": [], "failed": [], "missing": []}
        stats = self.peers.setdefault(peer, PeerStats())
        t0 = time.perf_counter()
        try:
            cached = peer in self._ports
            job = await self._transfer(sess, peer, hashes, stats)
            if job.errors and not job.status:  # no stream got in: nothing was received
                self._ports.pop(peer, None)  # moved (a restarted peer) or gone
                if cached:  # the address was an old answer: ask again, once
                    job = await self._transfer(sess, peer, hashes, stats)
        finally:
            stats.seconds += time.perf_counter() - t0
        status = job.status
        out: dict[str, Any] = {
            "pulled": [h for h in hashes if status.get(h) == "ok"],
            "missing": [h for h in hashes if status.get(h) == "missing"],
        }
        out["failed"] = [h for h in hashes if status.get(h) not in ("ok", "missing")]
        stats.blocks += len(out["pulled"])
        stats.failed += len(out["failed"])
        if job.errors:
            out["error"] = job.errors[0]
            log.warning(
                "pull from %s: %d blocks failed: %s", peer, len(out["failed"]), out["error"]
            )
        return out

    async def _transfer(
        self, sess: Session, peer: str, hashes: list[bytes], stats: PeerStats
    ) -> _Pull:
        """Every stream of one attempt; ``status`` says what each run got."""
        host, port = await self._resolve(peer)
        per_run = self._run_blocks(len(hashes), sess.block_bytes)
        runs = deque(hashes[i : i + per_run] for i in range(0, len(hashes), per_run))
        job = _Pull(sess, peer, host, port, runs, stats, {}, [])
        await asyncio.gather(*(self._stream(job) for _ in range(min(self.streams, len(runs)))))
        return job

    def _run_blocks(self, n: int, block_bytes: int) -> int:
        """Blocks per fetch request: an equal share per stream, but no run under
        ``MIN_RUN`` (a stream's setup, a TLS handshake above all, is not worth
        less) and none over ``run_bytes``."""
        share = -(-n // self.streams) * block_bytes
        return max(1, min(self.run_bytes, max(MIN_RUN, share)) // block_bytes)

    def _dial(self, job: _Pull) -> Conn:
        conn = dial(job.host, job.port, self.client_tls, self.timeout)
        try:
            client_handshake(conn.sock, self.token, self.node, job.peer)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _stream(self, job: _Pull) -> None:
        """One connection taking runs off the shared queue until it is empty or broken."""
        try:
            conn = await self._io(self._dial, job)
        except (OSError, TransferError, ValueError) as exc:  # FrameError is a ValueError
            job.errors.append(str(exc) or type(exc).__name__)
            return
        try:
            while job.runs:
                error = await self._pull_run(job, conn, job.runs.popleft())
                if error is not None:
                    job.errors.append(error)
                    break
        except asyncio.CancelledError:
            raise  # the run in flight closes the stream once its thread is done
        except BaseException:
            conn.close()
            raise
        conn.close()

    async def _pull_run(self, job: _Pull, conn: Conn, run: list[bytes]) -> str | None:
        sess = job.sess
        try:
            slots = self.pool.lease(sess, len(run))
        except PoolError as exc:
            return f"no room for pulled blocks: {exc}"
        spans = [self._slot_span(sess, s) for s in slots]
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            self._threads,
            receive_run,
            conn,
            sess.scope,
            run,
            spans,
            sess.block_bytes,
            self.pool.checksum_name,
        )
        try:
            res = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread may still be writing into the leased slots: free them after it.
            def after(_: object) -> None:
                self._free(sess, slots)
                conn.close()

            fut.add_done_callback(after)
            raise
        return self._settle(job, run, slots, res)

    def _settle(
        self, job: _Pull, run: list[bytes], slots: list[Slot], res: RunResult
    ) -> str | None:
        """Commit the verified blocks of a run (one ``stored`` event), free the rest."""
        sess, pool = job.sess, self.pool
        job.stats.bytes += res.nbytes
        used: set[int] = set()
        new, committed = [], []
        for i, h in enumerate(run):
            st = res.status[i]
            job.status[h] = st or "failed"
            if st == "corrupt":
                self.corrupt += 1
                log.warning("dropped block %s from %s: checksum mismatch", h.hex(), job.peer)
            if st != "ok":
                continue
            used.add(res.target[i])
            if pool.index.get((sess.scope, h)) is None:
                new.append(h)
            pool.commit(sess, slots[res.target[i]], h, checksum=res.checksums[i], publish=False)
            committed.append(h)
        self._free(sess, [s for k, s in enumerate(slots) if k not in used])
        if new:
            pool.events.publish("stored", tuple(new), "device")
        if committed:
            pool.release(sess, committed)  # visible and unpinned; the engine pins on lookup
        return res.error

    def _free(self, sess: Session, slots: list[Slot]) -> None:
        self.pool.release_slots(sess, [s for s in slots if s in sess.leased])

    def _slot_span(self, sess: Session, slot: Slot) -> Span:
        region, size = self.pool.region(sess.scope), sess.block_bytes
        off = Location(b"", slot.page, slot.index, "device").offset(self.pool.page_size, size)
        t = region.tensor()[off : off + size]
        if region.kind == "cpu":
            return Span(size, t.numpy().data, region.fd, off, addr=t.data_ptr())
        return Span(size, tensor=t)

    def summary(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "refused": self.refused,
            "corrupt": self.corrupt,
            "streams_per_peer": self.streams,
            "peers": {
                p: {
                    "bytes": s.bytes,
                    "blocks": s.blocks,
                    "failed": s.failed,
                    "gbps": round(s.gbps, 3),
                }
                for p, s in self.peers.items()
            },
        }


async def _pulls_disabled(_sess: Session, _msg: dict[str, Any]) -> dict[str, Any]:
    return {
        "ok": False,
        "error": "migration is disabled for this pool (KVCachePool spec.migration.enabled: "
        "false): blocks are recomputed, not pulled; enable it to pull from peers",
    }


async def start_transfer_service(
    cfg: AgentConfig, pool: Pool, proto: Any
) -> Callable[[], Awaitable[None]]:
    mig = cfg.migration

    async def nothing() -> None:
        return None

    if not mig.enabled:
        proto.extra_ops["pull"] = _pulls_disabled
        log.info("migration disabled by the pool (spec.migration.enabled: false): no transfer port")
        return nothing
    if mig.token_file is None:
        log.info("migration disabled: no transfer token configured")
        return nothing
    if mig.auth == "mtls" and not mig.cert_dir:
        raise TransferError(
            "migration.auth is mtls but migration.cert_dir is not set: mount the pool's "
            "transfer certificates there, or set auth: token"
        )
    server_tls, client_tls = tls_contexts(mig.cert_dir if mig.auth == "mtls" else None)
    svc = TransferService(
        pool,
        load_token(mig.token_file),
        cfg.node,
        mig.timeout_s,
        server_tls,
        client_tls,
        streams=mig.streams_per_peer,
        run_bytes=mig.run_bytes,
    )
    await svc.start(mig.host, mig.port)
    proto.extra_ops["pull"] = svc.pull
    pool.extra_summary["transfer"] = svc.summary
    log.info(
        "transfer service on %s:%d (%s, %d streams per peer)",
        mig.host,
        svc.port,
        "mTLS + token" if server_tls else "token",
        svc.streams,
    )
    return svc.stop
