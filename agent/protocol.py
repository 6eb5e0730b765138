"""The agent's unix-socket protocol: frames of ``kvmarina.framing``, one request, one reply.

Requests are msgpack maps with an ``op``; replies carry ``ok`` and either the
result or ``error`` (a message that says what was wrong). ``register`` must be
the first request of a connection; its reply carries the scope region's file
descriptor (SCM_RIGHTS), which the engine maps once. Every later request names
slots (``[page, index]``) and hashes only.

    register  {token, block_bytes, budget: {min_blocks, max_blocks, priority}}
              -> {session, node, boot_id, scope, region_size, page_size, block_bytes}
    lease     {n}                      -> {slots: [[page, index], ...]}
    commit    {items: [[page, index, hash], ...]} -> {locations: [[hash, page, index, tier]]}
    lookup    {hashes: [...]}          -> {n, pages: uint32 array, indices: uint32 array,
                                           tiers: b"d"/b"h" per hit}  (hit i is hashes[i])
    release   {hashes: [...], slots: [[page, index], ...]} -> {}
    stats     {}                       -> the pool summary
    ping      {}                       -> {}
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from kvmarina.agent.credentials import CredentialStore
from kvmarina.agent.index import Slot
from kvmarina.agent.pool import Budget, Pool, PoolError, PoolFull, Session
from kvmarina.framing import FrameError, encode_frame, read_frame, write_frame

log = logging.getLogger(__name__)
MAX_FRAME = 8 * 1024 * 1024
MAX_ITEMS = 1 << 16
TIER_CODES = {"device": ord("d"), "host": ord("h")}


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

    def __init__(self, pool: Pool, creds: CredentialStore, digest_bytes: int) -> None:
        self.pool, self.creds, self.digest_bytes = pool, creds, digest_bytes
        self.extra_ops: dict[
            str, Callable[[Session, dict[str, Any]], Awaitable[dict[str, Any]]]
        ] = {}
        self.refused = 0

    def _hashes(self, raw: Any) -> list[bytes]:
        if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
            raise ProtocolError("hashes must be a list")
        for h in raw:
            if not isinstance(h, bytes) or len(h) != self.digest_bytes:
                raise ProtocolError(
                    f"every hash must be {self.digest_bytes} bytes (the pool's hashing contract)"
                )
        return raw

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
                    continue
                reply = await self._dispatch(sess, msg)
                await write_frame(writer, reply, MAX_FRAME)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # one broken connection must never take the agent down
            log.exception("connection handler failed; dropping that connection")
        finally:
            if sess is not None:
                self.pool.close_session(sess)
            writer.close()

    async def _register(self, msg: Any, writer: asyncio.StreamWriter) -> Session | None:
        def refuse(reason: str) -> None:
            self.refused += 1
            log.warning("refused a registration: %s", reason)
            writer.write(encode_frame({"ok": False, "error": reason}))

        if not isinstance(msg, dict) or msg.get("op") != "register":
            refuse("the first request must be 'register' with a credential")
            return None
        ident = self.creds.identify(str(msg.get("token", "")))
        if ident is None:
            refuse("unknown credential: this agent does not know that serving token")
            return None
        b = msg.get("budget") or {}
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

    async def _dispatch(self, sess: Session, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            return {"ok": False, "error": "a request must be a map with an 'op'"}
        op = msg["op"]
        try:
            if op == "lease":
                n = msg.get("n")
                if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_ITEMS:
                    raise ProtocolError(f"lease needs 0 <= n <= {MAX_ITEMS}")
                return {"ok": True, "slots": [[s.page, s.index] for s in self.pool.lease(sess, n)]}
            if op == "commit":
                items = msg.get("items")
                if not isinstance(items, list) or len(items) > MAX_ITEMS:
                    raise ProtocolError("commit needs items: [[page, index, hash], ...]")
                slots = _slots([i[:2] if isinstance(i, list) else i for i in items])
                hashes = self._hashes(
                    [i[2] if isinstance(i, list) and len(i) > 2 else None for i in items]
                )
                locs = [self.pool.commit(sess, s, h) for s, h in zip(slots, hashes, strict=True)]
                return {"ok": True, "locations": [[x.hash, x.page, x.index, x.tier] for x in locs]}
            if op == "lookup":
                hits = self.pool.lookup_blocks(sess, self._hashes(msg.get("hashes")))
                # Compact reply: the client knows the hashes it asked for; hit i is
                # hashes[i] for i < n. Pages and indices as packed uint32 arrays.
                return {
                    "ok": True,
                    "n": len(hits),
                    "pages": array.array("I", [b.slot.page for b in hits]).tobytes(),
                    "indices": array.array("I", [b.slot.index for b in hits]).tobytes(),
                    "tiers": bytes(TIER_CODES[b.tier] for b in hits),
                }
            if op == "release":
                hashes, slots = self._hashes(msg.get("hashes", [])), _slots(msg.get("slots", []))
                self.pool.check_leased(sess, slots)  # all-or-nothing: check before changing
                self.pool.release(sess, hashes)
                self.pool.release_slots(sess, slots)
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
        except (PoolError, ProtocolError) as exc:
            return {"ok": False, "error": str(exc)}
