"""The engine's KV cache in the agent's pool: block tables over shared pages.

For each sequence the store keeps a block table (block ids in the scope
region, viewed as ``[N, L, 2, B, H, D]`` blocks — see ``kvmarina.kernels.layout``):

* ``open``: hash the prompt's full blocks (the contract, with the tenant salt),
  look up the longest cached run — this engine's, another engine's on the node,
  or blocks just pulled from a peer — and use those blocks in place (pinned, no copy);
* ``reserve``: lease fresh slots for the rest of the sequence;
* ``attention``: for a step, write the new tokens' K/V into their slots
  (reshape-and-cache) and run paged attention over the block tables;
* ``commit``: each newly filled full block is committed by hash, so others can use it;
* ``close``: release pins and unused slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvmarina.agent.client import (
    NO_HITS,
    AgentClient,
    AgentError,
    AgentFull,
    AgentUnavailable,
    Hit,
    Hits,
)
from kvmarina.engine.batch import StepBatch
from kvmarina.engine.kvstore import KVFull
from kvmarina.engine.model import Attention
from kvmarina.hashing import HashContract
from kvmarina.headers import PullHint
from kvmarina.kernels import paged_attention, paged_decode, reshape_and_cache
from kvmarina.kernels.layout import blocks_view, layer_views
from kvmarina.layout import KVLayout

log = logging.getLogger(__name__)


class PoolClient(Protocol):
    """What the store needs from ``AgentClient`` / ``LocalPool``."""

    region: torch.Tensor | None
    info: dict[str, Any]

    def lease(self, n: int) -> list[tuple[int, int]]: ...

    def commit(self, items: list[tuple[int, int, bytes]]) -> list[Hit]: ...

    def lookup(self, hashes: list[bytes]) -> Hits: ...

    def lookup_claim(self, hashes: list[bytes], claim: bool = True) -> tuple[Hits, int]: ...

    def release(
        self,
        hashes: list[bytes],
        slots: list[tuple[int, int]] | None = None,
        unclaim: list[bytes] | None = None,
    ) -> None: ...

    def pull(self, peer: str, hashes: list[bytes], node: str | None = None) -> dict[str, Any]: ...


@dataclass(eq=False)
class SeqKV:
    """Invariants: ``block_ids[i]`` holds tokens ``i*B .. (i+1)*B - 1``; blocks below
    ``committed`` are in the index and pinned by us (``pinned``); ``leased`` maps a
    block number to the slot we leased for it and have not committed; the
    agent counts this sequence as computing its usable blocks from ``committed``
    on, except the first ``pending``, which another engine of the node is
    computing (as of the last lookup)."""

    salt: str
    hashes: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    committed: int = 0
    pinned: list[bytes] = field(default_factory=list)
    leased: dict[int, tuple[int, int]] = field(default_factory=dict)
    used_blocks: int = 0  # blocks that hold at least one written token
    pending: int = 0
    usable: int = 0  # prompt blocks a lookup may use (one prompt token is always computed)


class PagedStore:
    def __init__(
        self, client: PoolClient, layout: KVLayout, contract: HashContract, identity: str
    ) -> None:
        if layout.block_size != contract.block_size:
            raise ValueError(
                f"KV layout block size {layout.block_size} differs from the "
                f"pool's contract ({contract.block_size})"
            )
        self.client, self.layout, self.contract, self.identity = client, layout, contract, identity
        self.block_size = layout.block_size
        self.seqs: dict[int, SeqKV] = {}
        self.pulled_blocks = 0
        self.adopted_blocks = 0
        self.reconnects = 0
        self.reclaimed = 0
        self._map()
        watch = getattr(client, "watch", None)
        if watch is not None:
            # Reclaim requests run on the scheduler's thread, from poll(): no lock needed.
            watch(self._on_reclaim, background=False)

    def _map(self) -> None:
        page = int(self.client.info["page_size"])
        if page % self.layout.bytes_per_block:
            raise ValueError(
                f"the pool's page size ({page} bytes) is not a multiple of this "
                f"model's KV block ({self.layout.bytes_per_block} bytes, "
                f"{self.layout.describe()}); choose a pageSize that is"
            )
        assert self.client.region is not None
        self.per_page = page // self.layout.bytes_per_block
        self.blocks = blocks_view(self.client.region, self.layout)
        # each layer's K and V caches (strided views), made once per mapping, not per step
        self.layer_kv = [layer_views(self.blocks, i) for i in range(self.layout.num_layers)]

    def _block_id(self, page: int, index: int) -> int:
        return page * self.per_page + index

    # ------------------------------------------------------------ KVStore API

    def _reconnect(self) -> None:
        """The agent went away (restart): register again and map the new region.
        Sequences of the old connection are gone with it (their pins died with the
        old agent); the scheduler fails them, so nothing served later uses stale blocks."""
        self.seqs.clear()
        self.client.connect()  # type: ignore[attr-defined]
        self._map()
        self.reconnects += 1
        log.warning("re-registered with the agent (boot %s)", self.client.info.get("boot_id"))

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except AgentUnavailable:
            self._reconnect()
            raise RuntimeError("the agent restarted; in-flight requests were failed") from None

    def open(self, seq_id: int, prompt: list[int], salt: str, pull: PullHint | None = None) -> int:
        try:
            return self._open(seq_id, prompt, salt, pull)
        except AgentUnavailable:
            self._reconnect()  # a new request after an agent restart: register and go on
            return self._open(seq_id, prompt, salt, pull)

    def _hashes(self, prompt: list[int], salt: str) -> tuple[list[bytes], list[bytes]]:
        """The prompt's block hashes, and those a lookup may use (>= 1 token computed)."""
        hashes = self.contract.block_hashes(prompt, self.identity, salt)
        return hashes, hashes[: (len(prompt) - 1) // self.block_size]

    def _open(self, seq_id: int, prompt: list[int], salt: str, pull: PullHint | None) -> int:
        hashes, usable = self._hashes(prompt, salt)
        if pull is not None and usable:
            self._pull(pull, usable[: pull.blocks])
        hits: Hits = NO_HITS
        pending = 0
        try:
            if usable:  # claims the blocks this sequence will compute
                hits, pending = self.client.lookup_claim(usable)
        except AgentUnavailable:
            raise
        except AgentError as exc:
            log.warning("lookup failed (%s); computing the whole prompt", exc)
        seq = SeqKV(salt, hashes, pending=pending, usable=len(usable))
        seq.block_ids = list(map(self._block_id, hits.pages, hits.indices))
        seq.pinned = list(hits.hashes)
        seq.committed = len(hits)
        self.seqs[seq_id] = seq
        return len(hits) * self.block_size

    def prefetch(self, prompt: list[int], salt: str, hint: PullHint) -> None:
        """Pull the prompt's blocks the router says a peer holds, before the request
        reaches the scheduler: called from a worker thread (the client serializes its
        calls), so a slow or stalled peer delays this request only, not every sequence
        the scheduler is running. ``open`` then finds them like any local block."""
        _, usable = self._hashes(prompt, salt)
        if usable:  # a failed pull is logged by _pull; open() then computes, or reconnects
            self._pull(hint, usable[: hint.blocks])

    def _pull(self, hint: PullHint, hashes: list[bytes]) -> None:
        try:
            reply = self.client.pull(hint.agent, hashes, hint.node)
        except AgentError as exc:  # the pull is an optimisation: recompute instead
            log.info(
                "pull of %d blocks from %s failed (%s); recomputing", len(hashes), hint.node, exc
            )
            return
        pulled, error = int(reply.get("pulled", 0)), reply.get("error")
        self.pulled_blocks += pulled
        missing, failed = len(reply.get("missing") or ()), len(reply.get("failed") or ())
        if missing or failed or error:
            # the router's hint was stale (evicted, or not committed yet) or the peer
            # failed: say so, since the cost is a recomputation nobody else sees
            log.info(
                "pull from %s: %d of %d blocks pulled, %d missing there, %d failed%s; "
                "recomputing the rest",
                hint.node,
                pulled,
                len(hashes),
                missing,
                failed,
                f" ({error})" if error else "",
            )

    def reserve(self, seq_id: int, total_tokens: int) -> None:
        seq = self.seqs[seq_id]
        need = -(-total_tokens // self.block_size) - len(seq.block_ids)
        if need <= 0:
            return
        try:
            slots = self._guard(self.client.lease, need)
        except AgentFull as exc:
            raise KVFull(str(exc)) from None
        for page, index in slots:
            seq.leased[len(seq.block_ids)] = (page, index)
            seq.block_ids.append(self._block_id(page, index))

    def attention(self, batch: StepBatch) -> Attention:
        return _StepAttention(self, batch)

    def commit(self, seq_id: int, tokens: list[int]) -> None:
        seq = self.seqs[seq_id]
        full = len(tokens) // self.block_size
        if full <= seq.committed:
            return
        while len(seq.hashes) < full:  # generated tokens extend the chain
            start = len(seq.hashes) * self.block_size
            seq.hashes += self.contract.block_hashes(
                tokens[start : full * self.block_size],
                self.identity,
                seq.salt,
                parent=seq.hashes[-1] if seq.hashes else None,
            )
        items = []
        for i in range(seq.committed, full):
            page, index = seq.leased.pop(i)
            items.append((page, index, seq.hashes[i]))
        for i, hit in zip(
            range(seq.committed, full), self._guard(self.client.commit, items), strict=True
        ):
            # Someone else committed the same block first: use theirs (identical bytes).
            seq.block_ids[i] = self._block_id(hit.page, hit.index)
            seq.pinned.append(hit.hash)
        seq.committed = full

    def adopt(self, seq_id: int, computed: int, prompt_len: int) -> int:
        """Take the prompt blocks that were committed since this sequence was admitted
        (by another sequence of this engine, or another engine on the node) instead of
        computing them; returns the tokens now computed.

        Two requests with one new prefix, admitted together, would otherwise both
        compute it: the second one's lookup ran before the first committed anything.
        Only blocks from ``committed`` on, when nothing has been written past it."""
        seq = self.seqs.get(seq_id)
        bsz = self.block_size
        if seq is None or computed != seq.committed * bsz:
            return computed
        start, end = seq.committed, (prompt_len - 1) // bsz  # compute >= 1 token
        if end <= start:
            return computed
        try:
            # claims again: blocks another engine gave up on are now ours to compute
            hits, seq.pending = self._guard(self.client.lookup_claim, seq.hashes[start:end])
        except AgentError as exc:
            log.info("late lookup failed (%s); computing", exc)
            seq.pending = 0
            return computed
        give: list[tuple[int, int]] = []
        for i, hit in enumerate(hits, start):
            block_id = self._block_id(hit.page, hit.index)
            if i < len(seq.block_ids):
                slot = seq.leased.pop(i, None)
                if slot is not None:
                    give.append(slot)
                seq.block_ids[i] = block_id
            else:  # reserved room was given back under pressure
                seq.block_ids.append(block_id)
            seq.pinned.append(hit.hash)
        if give:
            self._guard(self.client.release, [], give)
        seq.committed = start + len(hits)
        seq.used_blocks = max(seq.used_blocks, seq.committed)
        self.adopted_blocks += len(hits)
        return seq.committed * bsz

    def behind(self, seq_id: int) -> bool:
        """The next block this sequence would compute is one an earlier sequence of
        this engine is computing now (in its chain, not committed yet): computing it
        in the same step would duplicate that work and forfeit the hit, so the
        scheduler skips this sequence for a step and it adopts the block after.

        Only earlier sequences count, so two never wait for each other. Equal hashes
        at one position mean equal prefixes (the hashes are chained)."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.committed >= len(seq.hashes):
            return False
        i = seq.committed
        h = seq.hashes[i]
        return any(
            other_id < seq_id and other.committed <= i < len(other.hashes) and other.hashes[i] == h
            for other_id, other in self.seqs.items()
        )

    def peer_computing(self, seq_id: int) -> bool:
        """Another engine of the node is computing the next blocks this sequence
        needs (the agent's claims, as of its last lookup): waiting and adopting them
        costs nothing but time, computing them again costs the node a copy."""
        seq = self.seqs.get(seq_id)
        return seq is not None and seq.pending > 0

    def close(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        # claimed blocks never computed (a cancelled or failed request): others
        # waiting for them must compute them themselves
        unclaim = seq.hashes[seq.committed : seq.usable]
        try:
            self.client.release(seq.pinned, list(seq.leased.values()), unclaim)
        except AgentUnavailable:
            self._reconnect()
        except AgentError as exc:
            log.warning("release of sequence %d failed: %s", seq_id, exc)

    def poll(self) -> None:
        """Handle requests the agent pushed (reclaim under pressure); call between steps."""
        poll = getattr(self.client, "poll", None)
        if poll is not None:
            try:
                poll()
            except AgentError as exc:
                log.info("polling the agent failed: %s", exc)

    def _on_reclaim(self, n: int) -> None:
        """Give back up to ``n`` cold blocks: slots reserved for tokens not generated yet
        (beyond one spare block per sequence). A sequence re-leases as it grows."""
        give: list[tuple[int, int]] = []
        for seq in self.seqs.values():
            keep = seq.used_blocks + 1
            for i in sorted(seq.leased, reverse=True):
                if i < keep or len(give) >= n:
                    break
                give.append(seq.leased.pop(i))
                del seq.block_ids[i:]
        if give:
            self.client.release([], give)
            self.reclaimed += len(give)
            log.info("returned %d reserved KV blocks to the agent on request", len(give))

    def usage(self) -> dict[str, int]:
        return {
            "sequences": len(self.seqs),
            "blocks_held": sum(len(s.block_ids) for s in self.seqs.values()),
            "pulled_blocks": self.pulled_blocks,
        }

    def report_load(self, running: int, waiting: int) -> None:
        """To the agent, which pushes it to the node's routers; only an engine that
        registered with its pod name has one to report under (``LocalPool`` has none)."""
        if isinstance(self.client, AgentClient) and self.client.pod:
            self._guard(self.client.report_load, running, waiting)


class _StepAttention:
    """The per-step metadata, built once (plain Python, one tensor each); ``__call__``
    runs for every layer and only reads it."""

    def __init__(self, store: PagedStore, batch: StepBatch) -> None:
        bsz = store.block_size
        self.store, self.batch = store, batch
        slots: list[int] = []
        rows: list[list[int]] = []
        ctx: list[int] = []
        for sid, cached, n in zip(batch.seq_ids, batch.cached_lens, batch.new_lens, strict=True):
            seq = store.seqs[sid]
            ids = seq.block_ids
            slots += [ids[pos // bsz] * bsz + pos % bsz for pos in range(cached, cached + n)]
            total = cached + n
            nb = -(-total // bsz)  # the blocks this step reads: only those in use
            seq.used_blocks = max(seq.used_blocks, nb)
            ctx.append(total)
            rows.append(ids[:nb])
        width = max(len(r) for r in rows)
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64)
        self.block_tables = torch.tensor(
            [r + [0] * (width - len(r)) for r in rows], dtype=torch.int32
        )
        self.ctx_lens = torch.tensor(ctx, dtype=torch.int64)
        self.decode_only = all(n == 1 for n in batch.new_lens)
        if not self.decode_only:
            self.q_lens = torch.tensor(batch.new_lens, dtype=torch.int64)
            self.q_starts = torch.tensor(batch.starts, dtype=torch.int64)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = self.store.layer_kv[layer]
        check = layer == 0  # the metadata is the same for every layer: check it once
        reshape_and_cache(k, v, k_cache, v_cache, self.slot_mapping, check=check)
        if self.decode_only:
            return paged_decode(q, k_cache, v_cache, self.block_tables, self.ctx_lens, check=check)
        return paged_attention(
            q,
            k_cache,
            v_cache,
            self.block_tables,
            self.q_starts,
            self.q_lens,
            self.ctx_lens,
            check=check,
        )
