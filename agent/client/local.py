"""The agent client's API over a private in-process pool (``kvmarina engine --no-agent``)."""

from __future__ import annotations

from typing import Any

import torch

from kvmarina.agent.client.connection import AgentError, AgentFull, RegionBlocks
from kvmarina.agent.client.hits import TIER_CODES, Hit, Hits


class LocalPool(RegionBlocks):
    """The ``AgentClient`` API over a private in-process pool (``engine --no-agent``).

    Same slots, same index, same eviction; nothing is shared with other processes.
    """

    def __init__(
        self,
        block_bytes: int,
        device_bytes: int,
        page_size: int = 2 * 1024 * 1024,
        policy: str = "lru",
    ) -> None:
        from kvmarina.agent.node.credentials import Identity
        from kvmarina.agent.node.pool import Budget as PoolBudget
        from kvmarina.agent.node.pool import Pool

        self.block_bytes = block_bytes
        self._pool = Pool(
            node="local",
            backend="cpu",
            page_size=page_size,
            device_pages=max(1, device_bytes // page_size),
            host_pages=0,
            policy=policy,
        )
        self._sess = self._pool.open_session(
            Identity("engine", "local", "none"), block_bytes, PoolBudget()
        )
        self.region: torch.Tensor | None = self._pool.region(self._sess.scope).tensor()
        self.info: dict[str, Any] = {
            "page_size": page_size,
            "node": "local",
            "boot_id": self._pool.events.boot_id,
        }

    def connect(self) -> LocalPool:
        return self

    def sibling(self) -> LocalPool:
        """Another engine's session on this same pool: two engines of one node in one
        process (what tests and benchmarks of node-level sharing need)."""
        from kvmarina.agent.node.pool import Budget as PoolBudget

        other = object.__new__(LocalPool)
        other.block_bytes, other._pool = self.block_bytes, self._pool
        other._sess = self._pool.open_session(self._sess.ident, self.block_bytes, PoolBudget())
        other.region, other.info = self.region, self.info
        return other

    def close(self) -> None:
        self._pool.close_session(self._sess)

    def _guard(self, fn: Any, *args: Any) -> Any:
        from kvmarina.agent.node.pool import PoolError, PoolFull

        try:
            return fn(*args)
        except PoolFull as exc:
            raise AgentFull(str(exc)) from None
        except PoolError as exc:
            raise AgentError(str(exc)) from None

    def lease(self, n: int) -> list[tuple[int, int]]:
        return [(s.page, s.index) for s in self._guard(self._pool.lease, self._sess, n)]

    def commit(self, items: list[tuple[int, int, bytes]]) -> list[Hit]:
        from kvmarina.agent.node.index import Slot

        out = []
        for p, i, h in items:
            loc = self._guard(self._pool.commit, self._sess, Slot(p, i), h)
            out.append(Hit(loc.hash, loc.page, loc.index, loc.tier))
        return out

    def lookup(self, hashes: list[bytes]) -> Hits:
        return self.lookup_claim(hashes, claim=False)[0]

    def lookup_claim(self, hashes: list[bytes], claim: bool = True) -> tuple[Hits, int]:
        blocks = self._guard(self._pool.lookup_blocks, self._sess, hashes)
        pending = self._pool.in_flight(self._sess, hashes[len(blocks) :], claim)
        codes = bytes(TIER_CODES[b.tier] for b in blocks)
        hits = Hits(
            hashes[: len(blocks)],
            [b.slot.page for b in blocks],
            [b.slot.index for b in blocks],
            codes if b"h" in codes else None,
        )
        return hits, pending

    def release(
        self,
        hashes: list[bytes],
        slots: list[tuple[int, int]] | None = None,
        unclaim: list[bytes] | None = None,
    ) -> None:
        from kvmarina.agent.node.index import Slot

        self._guard(self._pool.release, self._sess, list(hashes))
        self._guard(self._pool.release_slots, self._sess, [Slot(p, i) for p, i in slots or []])
        self._pool.unclaim(self._sess, list(unclaim or []))

    def stats(self) -> dict[str, Any]:
        return self._pool.summary()

    def pull(self, peer: str, hashes: list[bytes], node: str | None = None) -> dict[str, Any]:
        raise AgentError("'pull' needs a node agent (engine runs with --no-agent)")

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        raise AgentError(f"{msg.get('op')!r} needs a node agent (engine runs with --no-agent)")
