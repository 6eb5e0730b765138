"""The agent's unix-socket protocol: frames of ``kvmarina.framing``, one request, one reply.

Requests are msgpack maps with an ``op``; replies carry ``ok`` and either the
result or ``error`` (a message that says what was wrong). ``register`` must be
the first request of a connection; its reply carries the scope region's file
descriptor (SCM_RIGHTS), which the engine maps once. Every later request names
slots (``[page, index]``) and hashes only.

    register  {token, block_bytes, budget: {min_blocks, max_blocks, priority},
               evict_own?: "lru" | "lfu", pod?: name}
              -> {session, node, boot_id, scope, region_size, page_size, block_bytes,
                  digest_bytes}   (a refusal carries page_size too)
    lease     {n, prefer?: [hash]}     -> {slots: [[page, index], ...]}
              (when the pool is full, the agent pushes {push: "reclaim", n} to holders
              it may take from, waits up to reclaim_timeout_s for releases, retries;
              an evict_own session past its max first drops its own unpinned blocks,
              ``prefer`` first, then in its order)
    commit    {items: [[page, index, hash], ...], tag?: bytes, replace?: bool, peek?: n}
              -> {locations: [[hash, page, index, tier]], replaced?: [bytes | None]}
              (replace: one item, bound to its hash in place of the serving's own
              unpinned block; code "busy" while a reader pins it)
    lookup    {hashes: [...], claim?: bool}
              -> {n, pages: uint32 array, indices: uint32 array,
                  tiers: b"d"/b"h" per hit,   (hit i is hashes[i])
                  pending}  (blocks from hashes[n] on that another engine is computing;
              claim: the blocks after those become this session's to compute, until
              committed or unclaimed: see ``kvmarina.agent.node.claims``)
    release   {hashes: [...], slots: [[page, index], ...], unclaim?: [hash]} -> {}
    drop      {hashes, peek?: n}       -> {removed: [hash], busy: [hash], peeked: [bytes|None]}
              (the serving's own blocks only; pinned ones stay, listed as busy)
    probe     {hashes, peek?: n}       -> {n, peek: bytes | None}  (no pin, no use counted)
    count     {tags: [bytes]}          -> {blocks: [n per tag], evicted: [n per tag]}
    stats     {}                       -> the pool summary
    ping      {}                       -> {}
    load      {running, waiting, queued?} -> {}  (the engine's load, pushed to the
              node's event subscribers as a ``load`` record naming its pod: router
              replicas learn what the others sent it at once; needs ``pod`` at register)

Pushed by the agent (frames with ``push`` instead of ``ok``; may arrive before
any reply): ``{push: "reclaim", n, serving}``: please release about ``n`` cold blocks.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from kvmarina.agent.client.hits import TIER_CODES
from kvmarina.agent.node import blockops
from kvmarina.agent.node.credentials import CredentialStore
from kvmarina.agent.node.index import Slot
from kvmarina.agent.node.pool import Budget, OverMax, Pool, PoolError, PoolFull, Session
from kvmarina.events import LoadRecord
from kvmarina.framing import FrameError, encode_frame, read_frame, write_frame

log = logging.getLogger(__name__)
MAX_FRAME = 8 * 1024 * 1024
MAX_ITEMS = 1 << 16
MAX_TAG = 64
EVICT_OWN = ("", "lru", "lfu")
MAX_POD_NAME = 253  # a Kubernetes object name
DEVICE_CODE = bytes([TIER_CODES["device"]])


class ProtocolError(ValueError):
    pass


def _slots(raw: Any) -> list[Slot]:
    if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
        raise ProtocolError("slots must be a list of [page, index] pairs")
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) < 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item[:2])
        ):
            raise ProtocolError(f"bad slot {item!r}: expected [page, index] of integers >= 0")
        out.append(Slot(item[0], item[1]))
    return out


class AgentProtocol:
    """Serves one pool on a unix socket. ``extra_ops`` lets other modules (migration)
    add operations without this module knowing them."""

    def __init__(
        self,
        pool: Pool,
        creds: CredentialStore,
        digest_bytes: int,
        reclaim_timeout_s: float = 5.0,
    ) -> None:
        self.pool, self.creds, self.digest_bytes = pool, creds, digest_bytes
        self.reclaim_timeout_s = reclaim_timeout_s
        self.writers: dict[int, asyncio.StreamWriter] = {}  # session id -> its connection
        self._freed = asyncio.Event()  # set (and replaced) whenever blocks may have freed
        self.extra_ops: dict[
            str, Callable[[Session, dict[str, Any]], Awaitable[dict[str, Any]]]
        ] = {}
        self.refused = 0

    def _hashes(self, raw: Any) -> list[bytes]:
        if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
            raise ProtocolError("hashes must be a list")
        # Checked in C, not per hash in Python (a lookup names thousands): every
        # length is digest_bytes (len() refuses None and numbers), and join()
        # refuses what is not bytes (a decoded frame holds no other bytes-like type).
        try:
            if list(map(len, raw)).count(self.digest_bytes) == len(raw):
                b"".join(raw)
                return raw
        except TypeError:
            pass
        raise ProtocolError(
            f"every hash must be {self.digest_bytes} bytes (the pool's hashing contract)"
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sess: Session | None = None
        try:
            while True:
                try:
                    msg = await read_frame(reader, MAX_FRAME)
                except EOFError:
                    return
                except FrameError as exc:
                    await write_frame(writer, {"ok": False, "error": str(exc)})
                    return  # the stream is out of sync: drop the connection
                if sess is None:
                    sess = await self._register(msg, writer)
                    if sess is None:
                        return
                    self.writers[sess.id] = writer
                    continue
                reply = await self._dispatch(sess, msg)
                await write_frame(writer, reply, MAX_FRAME)
                if isinstance(msg, dict) and msg.get("op") in ("release", "commit"):
                    self._wake()  # a lease waiting on a reclaim may now succeed
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # one broken connection must never take the agent down
            log.exception("connection handler failed; dropping that connection")
        finally:
            if sess is not None:
                self.writers.pop(sess.id, None)
                self.pool.close_session(sess)
                self._wake()
            writer.close()

    async def _register(self, msg: Any, writer: asyncio.StreamWriter) -> Session | None:
        def refuse(reason: str) -> None:
            self.refused += 1
            log.warning("refused a registration: %s", reason)
            writer.write(
                encode_frame({"ok": False, "error": reason, "page_size": self.pool.page_size})
            )

        if not isinstance(msg, dict) or msg.get("op") != "register":
            refuse("the first request must be 'register' with a credential")
            return None
        self.creds.refresh()  # a serving added since start has its token in the new file
        ident = self.creds.identify(str(msg.get("token", "")))
        if ident is None:
            refuse("unknown credential: this agent does not know that serving token")
            return None
        b = msg.get("budget") or {}
        if not isinstance(b, dict):
            refuse("bad register request: budget must be a map")
            return None
        evict_own = msg.get("evict_own", "")
        if evict_own not in EVICT_OWN:
            refuse(f"bad register request: evict_own {evict_own!r} is not lru or lfu")
            return None
        pod = msg.get("pod", "")
        if not isinstance(pod, str) or len(pod) > MAX_POD_NAME:
            refuse(f"bad register request: pod must be a name of at most {MAX_POD_NAME} characters")
            return None
        try:
            budget = Budget(
                int(b.get("min_blocks", 0)),
                int(b.get("max_blocks", 1 << 40)),
                int(b.get("priority", 100)),
            )
            sess = self.pool.open_session(ident, int(msg["block_bytes"]), budget)
        except (KeyError, TypeError, ValueError) as exc:
            refuse(f"bad register request: {exc}")
            return None
        sess.evict_own = evict_own
        sess.pod = pod
        region = self.pool.region(sess.scope)
        reply = encode_frame(
            {
                "ok": True,
                "session": sess.id,
                "node": self.pool.node,
                "boot_id": self.pool.events.boot_id,
                "scope": sess.scope,
                "region_size": region.size,
                "page_size": self.pool.page_size,
                "block_bytes": sess.block_bytes,
                "digest_bytes": self.digest_bytes,
                "backend": region.kind,
            }
        )
        # Nothing else has been written on this connection: the reply and its fd
        # go out in one sendmsg, ahead of anything the transport might buffer.
        # asyncio's socket wrapper has no sendmsg, so use a duplicate of the fd.
        fds = array.array("i", [region.fd])
        raw = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        try:
            raw.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        finally:
            raw.close()
        log.info(
            "registered %s/%s (scope %s) as session %d",
            ident.namespace,
            ident.serving,
            sess.scope,
            sess.id,
        )
        return sess

    def _wake(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    async def _lease(self, sess: Session, n: int, prefer: list[bytes] | None = None) -> list[Slot]:
        """Lease ``n`` slots; when full, ask holders to release cold blocks and
        retry as releases come in, for at most ``reclaim_timeout_s``."""
        try:
            return self.pool.lease(sess, n, prefer)
        except OverMax:
            raise
        except PoolFull:
            targets = self.pool.reclaim_targets(sess, n)
            if not targets or self.reclaim_timeout_s <= 0:
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reclaim_timeout_s
        for sid, k in targets.items():
            writer = self.writers.get(sid)
            if writer is not None and not writer.is_closing():
                # one write() call per frame: never interleaves with a reply
                writer.write(encode_frame({"push": "reclaim", "n": k, "serving": sess.ident.key}))
        self.pool.stats["reclaim_requests"] += len(targets)
        log.info(
            "pool full: asked %d holder(s) to release blocks for %s",
            len(targets),
            sess.ident.serving,
        )
        while True:
            freed = self._freed
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                break
            try:
                slots = self.pool.lease(sess, n, prefer)
                self.pool.stats["reclaimed_leases"] += 1
                return slots
            except OverMax:
                raise
            except PoolFull:
                continue
        try:  # one last try: a release may have landed with the deadline
            return self.pool.lease(sess, n, prefer)
        except PoolFull as exc:
            raise PoolFull(
                f"{exc} (asked {len(targets)} holder(s) to release; not enough freed "
                f"within {self.reclaim_timeout_s:g}s)"
            ) from None

    def _load(self, sess: Session, msg: dict[str, Any]) -> dict[str, Any]:
        """An engine's load, pushed to the node's event subscribers (the routers)."""
        if not sess.pod:
            raise ProtocolError("load needs a session registered with its pod name ('pod')")
        running, waiting, queued = msg.get("running"), msg.get("waiting"), msg.get("queued")
        figures = (running, waiting) if queued is None else (running, waiting, queued)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in figures):
            raise ProtocolError("load needs running and waiting (and queued) as integers >= 0")
        self.pool.events.publish_load(LoadRecord(sess.pod, *figures))
        return {"ok": True}

    async def _dispatch(self, sess: Session, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            return {"ok": False, "error": "a request must be a map with an 'op'"}
        op = msg["op"]
        try:
            if op == "lease":
                n = msg.get("n")
                if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_ITEMS:
                    raise ProtocolError(f"lease needs 0 <= n <= {MAX_ITEMS}")
                prefer = self._hashes(msg.get("prefer") or [])
                slots = await self._lease(sess, n, prefer)
                return {"ok": True, "slots": [[s.page, s.index] for s in slots]}
            if op == "load":
                return self._load(sess, msg)
            if op == "commit" and (msg.get("replace") or msg.get("tag")):
                return self._commit_tagged(sess, msg)
            if op in ("drop", "probe", "count"):
                return self._own_op(sess, op, msg)
            if op == "commit":
                items = msg.get("items")
                if not isinstance(items, list) or len(items) > MAX_ITEMS:
                    raise ProtocolError("commit needs items: [[page, index, hash], ...]")
                slots = _slots([i[:2] if isinstance(i, list) else i for i in items])
                hashes = self._hashes(
                    [i[2] if isinstance(i, list) and len(i) > 2 else None for i in items]
                )
                locs = self.pool.commit_many(sess, list(zip(slots, hashes, strict=True)))
                return {"ok": True, "locations": [[x.hash, x.page, x.index, x.tier] for x in locs]}
            if op == "lookup":
                hashes = self._hashes(msg.get("hashes"))
                hits = self.pool.lookup_blocks(sess, hashes)
                n = len(hits)
                pending = self.pool.in_flight(sess, hashes[n:], bool(msg.get("claim")))
                # Compact reply: the client knows the hashes it asked for; hit i is
                # hashes[i] for i < n. Pages and indices as packed uint32 arrays.
                # One pass per field (no per-hit generator); tiers: all device, as a
                # lookup promotes host hits, unless a block says otherwise.
                tiers = [b.tier for b in hits]
                if tiers.count("device") == n:
                    codes = DEVICE_CODE * n
                else:
                    codes = bytes(map(TIER_CODES.__getitem__, tiers))
                return {
                    "ok": True,
                    "n": n,
                    "pages": array.array("I", [b.slot.page for b in hits]).tobytes(),
                    "indices": array.array("I", [b.slot.index for b in hits]).tobytes(),
                    "tiers": codes,
                    "pending": pending,
                }
            if op == "release":
                hashes, slots = self._hashes(msg.get("hashes", [])), _slots(msg.get("slots", []))
                unclaim = self._hashes(msg.get("unclaim", []))
                self.pool.check_leased(sess, slots)  # all-or-nothing: check before changing
                self.pool.release(sess, hashes)
                self.pool.release_slots(sess, slots)
                self.pool.unclaim(sess, unclaim)
                return {"ok": True}
            if op == "stats":
                return {"ok": True, **self.pool.summary()}
            if op == "ping":
                return {"ok": True, "boot_id": self.pool.events.boot_id}
            if op in self.extra_ops:
                return await self.extra_ops[op](sess, msg)
            return {"ok": False, "error": f"unknown op {op!r}"}
        except PoolFull as exc:
            return {"ok": False, "error": str(exc), "code": "full"}
        except blockops.Busy as exc:
            return {"ok": False, "error": str(exc), "code": "busy"}
        except (PoolError, ProtocolError) as exc:
            return {"ok": False, "error": str(exc)}

    # ------------------------------------------------------------ named values

    def _commit_tagged(self, sess: Session, msg: dict[str, Any]) -> dict[str, Any]:
        """``commit`` with a ``tag`` on every block, or ``replace`` of one block."""
        tag = msg.get("tag", b"")
        if not isinstance(tag, bytes) or len(tag) > MAX_TAG:
            raise ProtocolError(f"tag must be bytes of at most {MAX_TAG}")
        items = msg.get("items")
        if not isinstance(items, list) or len(items) > MAX_ITEMS:
            raise ProtocolError("commit needs items: [[page, index, hash], ...]")
        slots = _slots([i[:2] if isinstance(i, list) else i for i in items])
        hashes = self._hashes([i[2] if isinstance(i, list) and len(i) > 2 else None for i in items])
        if not msg.get("replace"):
            locs = self.pool.commit_many(sess, list(zip(slots, hashes, strict=True)), tag)
            return {"ok": True, "locations": [[x.hash, x.page, x.index, x.tier] for x in locs]}
        if len(items) != 1:
            raise ProtocolError("commit with replace takes exactly one item")
        loc, old = blockops.replace(
            sess=sess, pool=self.pool, slot=slots[0], block_hash=hashes[0], tag=tag, peek=_peek(msg)
        )
        return {
            "ok": True,
            "locations": [[loc.hash, loc.page, loc.index, loc.tier]],
            "replaced": [old],
        }

    def _own_op(self, sess: Session, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        if op == "count":
            tags = msg.get("tags")
            if not isinstance(tags, list) or not all(isinstance(t, bytes) for t in tags):
                raise ProtocolError("count needs tags: a list of bytes")
            counts = blockops.tag_counts(self.pool, sess, tags[:MAX_ITEMS])
            return {"ok": True, "blocks": [c[0] for c in counts], "evicted": [c[1] for c in counts]}
        hashes = self._hashes(msg.get("hashes"))
        if op == "probe":
            n, head = blockops.probe(self.pool, sess, hashes, _peek(msg)) if hashes else (0, None)
            return {"ok": True, "n": n, "peek": head}
        removed, busy, peeked = blockops.drop(self.pool, sess, hashes, _peek(msg))
        return {"ok": True, "removed": removed, "busy": busy, "peeked": peeked}


def _peek(msg: dict[str, Any]) -> int:
    peek = msg.get("peek", 0)
    if not isinstance(peek, int) or isinstance(peek, bool) or not 0 <= peek <= blockops.MAX_PEEK:
        raise ProtocolError(f"peek must be an integer from 0 to {blockops.MAX_PEEK}")
    return peek
