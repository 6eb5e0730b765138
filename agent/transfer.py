"""Moving KV blocks between agents: authenticated, checksummed, all-or-nothing per block.

Pull-based. The agent that lacks blocks connects to the peer that has them and
asks for them by hash; the peer streams, per block, a small msgpack header
(``hash``, ``size``, ``checksum``) and then the raw bytes. The receiver writes
the bytes into a freshly leased slot, verifies the xxh3 checksum recorded when
the block was committed, and only then commits it (the block becomes visible
and ``stored`` is published). A bad checksum, a short read or a timeout drops
that block; nothing partial is ever visible.

Authentication: with a certificate directory (``ca.crt``, ``tls.crt``,
``tls.key``) the stream is mutual TLS; either way both sides then prove they
hold the pool's transfer token with an HMAC challenge-response, so an
unauthenticated peer gets nothing (and is logged). Never pickle.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from kvmarina.agent.config import AgentConfig
from kvmarina.agent.pool import Pool, PoolError, Session
from kvmarina.framing import FrameError, read_frame, write_frame

log = logging.getLogger(__name__)
MAX_HEADER = 1 << 20
# Large stream buffers: a 2 MiB block then arrives in a few reads, not in 32 x 64 KiB ones.
STREAM_LIMIT = 16 * 1024 * 1024


class TransferError(RuntimeError):
    pass


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"|".join(parts), hashlib.sha256).digest()


def load_token(path: str | None) -> bytes:
    if path is None:
        raise TransferError("migration needs a token file (migration.token_file)")
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise TransferError(f"cannot read the transfer token {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise TransferError(f"the transfer token in {path} is too short (< 16 bytes)")
    return token


def tls_contexts(cert_dir: str | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts for mutual TLS, or (None, None) when TLS is off."""
    if not cert_dir:
        return None, None
    d = Path(cert_dir)
    ca, crt, key = d / "ca.crt", d / "tls.crt", d / "tls.key"
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    server.load_cert_chain(str(crt), str(key))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    client.load_cert_chain(str(crt), str(key))
    client.check_hostname = False  # peers are addressed by IP; the CA is the pool's own
    return server, client


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
class TransferService:
    """Serves blocks to peers and pulls blocks from them for local sessions.

    Invariant: ``_inflight`` maps (scope, hash) to the future of the one pull
    fetching it, so concurrent pulls of a block fetch it once.
    """

    pool: Pool
    token: bytes
    node: str
    timeout: float = 30.0
    server_tls: ssl.SSLContext | None = None
    client_tls: ssl.SSLContext | None = None
    port: int = 0
    peers: dict[str, PeerStats] = field(default_factory=dict)
    refused: int = 0
    corrupt: int = 0
    _inflight: dict[tuple[str, bytes], asyncio.Future[bool]] = field(default_factory=dict)
    _server: asyncio.Server | None = None

    # ------------------------------------------------------------ serving peers

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self.server_tls, limit=STREAM_LIMIT
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                accepted = await asyncio.wait_for(self._accept(reader, writer), self.timeout)
            except EOFError:  # left during the handshake: did not prove the token
                accepted = False
            if not accepted:
                self.refused += 1
                log.warning("refused an unauthenticated transfer peer %s", peer)
                return
            while True:
                try:
                    req = await asyncio.wait_for(read_frame(reader, MAX_HEADER), self.timeout)
                except EOFError:
                    return
                if not isinstance(req, dict) or req.get("op") != "fetch":
                    await write_frame(writer, {"ok": False, "error": "expected a fetch request"})
                    return
                await self._send_blocks(writer, str(req.get("scope", "")), req.get("hashes", []))
        except (TimeoutError, ConnectionError, FrameError, asyncio.IncompleteReadError) as exc:
            log.info("transfer peer %s: %s", peer, exc)
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        hello = await read_frame(reader, MAX_HEADER)
        if not isinstance(hello, dict) or not isinstance(hello.get("nonce"), bytes):
            return False
        nonce_s = os.urandom(16)
        await write_frame(
            writer, {"nonce": nonce_s, "mac": _mac(self.token, b"server", hello["nonce"], nonce_s)}
        )
        proof = await read_frame(reader, MAX_HEADER)
        want = _mac(self.token, b"client", hello["nonce"], nonce_s)
        ok = (
            isinstance(proof, dict)
            and isinstance(proof.get("mac"), bytes)
            and hmac.compare_digest(proof["mac"], want)
        )
        await write_frame(writer, {"ok": ok})
        return ok

    async def _send_blocks(self, writer: asyncio.StreamWriter, scope: str, hashes: Any) -> None:
        if not isinstance(hashes, list):
            await write_frame(writer, {"ok": False, "error": "hashes must be a list"})
            return
        for h in hashes:
            block = self.pool.index.get((scope, h)) if isinstance(h, bytes) else None
            if block is None:
                await write_frame(writer, {"hash": h, "found": False})
                continue
            self.pool.index.pin(block)  # not evicted while we send it
            try:
                await write_frame(
                    writer,
                    {
                        "hash": h,
                        "found": True,
                        "size": block.block_bytes,
                        "checksum": self.pool.checksum(block),
                    },
                )
                # Taken after the await: a lookup may have moved the block between
                # tiers meanwhile (its bytes, and so the checksum, never change).
                writer.write(self.pool.host_view(block))
                await writer.drain()
            finally:
                self.pool.index.unpin(block)

    # ------------------------------------------------------------ pulling

    async def pull(self, sess: Session, msg: dict[str, Any]) -> dict[str, Any]:
        """The ``pull`` operation of the agent socket: fetch ``hashes`` from ``peer``."""
        peer, hashes = msg.get("peer"), msg.get("hashes")
        if not isinstance(peer, str) or not isinstance(hashes, list):
            return {"ok": False, "error": "pull needs peer (host:port or agent URL) and hashes"}
        todo, waits = [], []
        for h in hashes:
            if not isinstance(h, bytes):
                return {"ok": False, "error": "hashes must be bytes"}
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
        except (TransferError, OSError, TimeoutError, FrameError) as exc:
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

    async def _connect(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = await self._resolve(peer)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.client_tls), self.timeout
        )
        nonce_c = os.urandom(16)
        await write_frame(writer, {"nonce": nonce_c, "node": self.node})
        challenge = await asyncio.wait_for(read_frame(reader, MAX_HEADER), self.timeout)
        if not isinstance(challenge, dict) or not hmac.compare_digest(
            challenge.get("mac", b""),
            _mac(self.token, b"server", nonce_c, challenge.get("nonce", b"")),
        ):
            writer.close()
            raise TransferError(f"peer {peer} failed to prove the transfer token")
        await write_frame(writer, {"mac": _mac(self.token, b"client", nonce_c, challenge["nonce"])})
        verdict = await asyncio.wait_for(read_frame(reader, MAX_HEADER), self.timeout)
        if not (isinstance(verdict, dict) and verdict.get("ok")):
            writer.close()
            raise TransferError(f"peer {peer} refused our transfer token")
        return reader, writer

    async def _resolve(self, peer: str) -> tuple[str, int]:
        """``host:port`` of the transfer service, or an agent URL (asks its /stats)."""
        if peer.startswith(("http://", "https://")):
            import aiohttp

            async with (
                aiohttp.ClientSession() as s,
                s.get(
                    peer.rstrip("/") + "/stats", timeout=aiohttp.ClientTimeout(total=self.timeout)
                ) as r,
            ):
                stats = await r.json()
            host = peer.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
            return host, int(stats["transfer"]["port"])
        host, _, port = peer.rpartition(":")
        return host, int(port)

    async def _fetch(self, sess: Session, peer: str, hashes: list[bytes]) -> dict[str, Any]:
        pulled: list[bytes] = []
        failed: list[bytes] = []
        missing: list[bytes] = []
        if not hashes:
            return {"pulled": pulled, "failed": failed, "missing": missing}
        stats = self.peers.setdefault(peer, PeerStats())
        t0 = time.perf_counter()
        reader, writer = await self._connect(peer)
        try:
            await write_frame(writer, {"op": "fetch", "scope": sess.scope, "hashes": hashes})
            for want in hashes:
                head = await asyncio.wait_for(read_frame(reader, MAX_HEADER), self.timeout)
                if not isinstance(head, dict) or head.get("hash") != want:
                    raise TransferError(f"peer {peer} answered out of order")
                if not head.get("found"):
                    missing.append(want)
                    continue
                size = int(head["size"])
                if size != sess.block_bytes:
                    raise TransferError(
                        f"peer block of {size} bytes, this session's are "
                        f"{sess.block_bytes}: different model layout"
                    )
                data = await asyncio.wait_for(reader.readexactly(size), self.timeout)
                stats.bytes += size
                if self._land(sess, want, data, int(head.get("checksum", -1))):
                    pulled.append(want)
                else:
                    failed.append(want)
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            TimeoutError,
            TransferError,
            FrameError,
        ) as exc:
            done = set(pulled) | set(missing) | set(failed)
            failed += [h for h in hashes if h not in done]
            log.warning("pull from %s stopped after %d blocks: %s", peer, len(pulled), exc)
        finally:
            writer.close()
            stats.seconds += time.perf_counter() - t0
            stats.blocks += len(pulled)
            stats.failed += len(failed)
        return {"pulled": pulled, "failed": failed, "missing": missing}

    def _land(self, sess: Session, h: bytes, data: bytes, checksum: int) -> bool:
        """Verify, then write and commit one block; nothing visible unless verified."""
        if xxhash.xxh3_64_intdigest(data) != checksum:
            self.corrupt += 1
            log.warning("dropped block %s: checksum mismatch", h.hex())
            return False
        try:
            (slot,) = self.pool.lease(sess, 1)
        except PoolError as exc:
            log.info("no room for a pulled block: %s", exc)
            return False
        self.pool.write_block(sess.scope, slot, sess.block_bytes, data)
        self.pool.commit(sess, slot, h, checksum)
        self.pool.release(sess, [h])  # visible and unpinned; the engine pins it on lookup
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "refused": self.refused,
            "corrupt": self.corrupt,
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


async def start_transfer_service(
    cfg: AgentConfig, pool: Pool, proto: Any
) -> Callable[[], Awaitable[None]]:
    mig = cfg.migration
    if mig.token_file is None:
        log.info("migration disabled: no transfer token configured")

        async def nothing() -> None:
            return None

        return nothing
    server_tls, client_tls = tls_contexts(mig.cert_dir if mig.auth == "mtls" else None)
    svc = TransferService(
        pool, load_token(mig.token_file), cfg.node, mig.timeout_s, server_tls, client_tls
    )
    await svc.start(mig.host, mig.port)
    proto.extra_ops["pull"] = svc.pull
    pool.extra_summary["transfer"] = svc.summary
    log.info(
        "transfer service on %s:%d (%s)",
        mig.host,
        svc.port,
        "mTLS + token" if server_tls else "token",
    )
    return svc.stop
