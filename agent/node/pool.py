"""The node's KV pool: regions per scope, slots, the block index, budgets, tiers, events.

All state changes happen on one thread (the agent's event loop), so the pool
needs no locks. Engines act through ``Session`` objects:

* ``lease(n)`` hands out ``n`` free block slots in the session's scope region
  (evicting unpinned blocks if it must, within budgets);
* the engine writes KV into them and ``commit``s each full block by hash: the
  block enters the index, pinned by the session, shareable by every engine of
  the scope (a hash already present keeps the existing copy);
* ``lookup`` returns the longest cached run from block 0 and pins it; host-tier
  hits are copied back into the device tier first; ``in_flight`` then says how
  many blocks past that run another engine is computing, and claims the rest
  for this one (``ClaimTable``);
* ``release`` unpins and frees what the session no longer needs; a session that
  disconnects is released whole.

Budgets per serving: usage = device slots the serving holds (leased + device
blocks it committed; ``usage.UsageTable``). Its ``min`` is guaranteed (it may
evict others' unpinned blocks to get back to it), its ``max`` is a hard cap, and
above ``min`` it may only evict blocks of servings with no higher priority that
are above their own minimum.

Who changes what: block refs, uses, tiers and eviction orders change only in
``BlockIndex``; leases and usage only in ``UsageTable``; a block leaves the pool
only through ``Pool.remove``. ``Pool.check_invariants`` checks all of it (the
state-machine test calls it after every step).

Beside this module: ``session`` (the types callers hold), ``storage`` (regions,
pages, slots, bytes), ``tiers`` (moves between device and host memory),
``budgets`` (who may take room from whom) and ``invariants`` (the full check).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from kvmarina.agent.memory import Region
from kvmarina.agent.node import budgets, checksums, tiers
from kvmarina.agent.node.claims import ClaimTable
from kvmarina.agent.node.credentials import Identity
from kvmarina.agent.node.index import Block, BlockIndex, InvariantError, Slot
from kvmarina.agent.node.invariants import check_pool
from kvmarina.agent.node.session import Budget, Location, OverMax, PoolError, PoolFull, Session
from kvmarina.agent.node.storage import Storage
from kvmarina.agent.node.usage import UsageTable
from kvmarina.agent_stats import AgentStats, TierPages
from kvmarina.event_log import EventLog

__all__ = [
    "Budget",
    "InvariantError",
    "Location",
    "OverMax",
    "Pool",
    "PoolError",
    "PoolFull",
    "Session",
]

log = logging.getLogger(__name__)
_KEY = operator.attrgetter("key")


class Pool:
    """The node's KV pool (see the module docstring). One thread, no locks.

    Invariants (``check_invariants`` raises ``InvariantError`` on the first broken one):

    * the index's, every slot pool's and both tiers' own (``BlockIndex``,
      ``SlotPool``, ``FreePages``);
    * every block's slot is allocated in the slot pool of its (scope, size,
      tier); every leased slot in its session's device slot pool; no slot is
      named twice; a slot pool holds no slot that is neither a block's nor
      leased (nothing leaks); the pages the slot pools hold are exactly the
      pages their tier handed out;
    * usage (``UsageTable``): a serving's count is its sessions' leased slots
      plus its device-tier blocks;
    * pins: a session's pin counts are ``> 0`` and name indexed blocks; the
      sessions' pins of a block add up to at most its ``refs`` (transfers pin
      blocks too, outside any session);
    * claims: ``ClaimTable``'s two maps agree, and only open sessions claim.
    """

    def __init__(
        self,
        *,
        node: str,
        backend: str,
        page_size: int,
        device_pages: int,
        host_pages: int,
        policy: str,
        events: EventLog | None = None,
        block_tokens: int = 16,
        checksum: str = "xxh3",
    ) -> None:
        self.node, self.backend, self.page_size = node, backend, page_size
        self.block_tokens = block_tokens  # tokens per block (the hashing contract's)
        self.checksum_name = checksums.check(checksum)  # the pool's migration.checksum
        self._checksum = checksums.one_shot(checksum)
        self.storage = Storage(
            node=node,
            backend=backend,
            page_size=page_size,
            device_pages=device_pages,
            host_pages=host_pages,
        )
        # the storage's, under the names every endpoint reads
        self.device, self.host = self.storage.device, self.storage.host
        self.regions, self.host_region = self.storage.regions, self.storage.host_region
        self.index = BlockIndex(policy)
        self.claims = ClaimTable()
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self.usage = UsageTable()  # namespace/serving -> device slots held
        self.budgets: dict[str, Budget] = {}
        self.events = events or EventLog(node, self.snapshot)
        self.stats: Counter[str] = Counter()
        self.tag_evictions: Counter[tuple[str, bytes]] = Counter()  # (scope, tag) -> drops
        # other services (transfers) add their figures to /stats here
        self.extra_summary: dict[str, Callable[[], dict[str, Any]]] = {}

    # ------------------------------------------------------------ regions and slots

    # ------------------------------------------------------------ regions

    def region(self, scope: str) -> Region:
        return self.storage.region(scope)

    def host_view(self, block: Block) -> memoryview:
        """A block's bytes readable on the CPU (a copy out of device memory on CUDA)."""
        return self.storage.host_view(block)

    def write_block(self, scope: str, slot: Slot, size: int, data: bytes) -> None:
        """Fill a leased device slot from bytes received on the CPU (a pulled block)."""
        self.storage.write_block(scope, slot, size, data)

    # ------------------------------------------------------------ sessions

    def open_session(self, ident: Identity, block_bytes: int, budget: Budget) -> Session:
        if block_bytes <= 0 or block_bytes > self.page_size:
            raise PoolError(
                f"block of {block_bytes} bytes does not fit a page of {self.page_size} bytes"
            )
        if not 0 <= budget.min_slots <= budget.max_slots:
            raise PoolError(
                f"budget of {ident.key}: need 0 <= min ({budget.min_slots}) "
                f"<= max ({budget.max_slots}) blocks"
            )
        sess = Session(next(self._ids), ident, block_bytes, budget)
        self.sessions[sess.id] = sess
        self.budgets[ident.key] = budget
        self.region(sess.scope)
        self._warn_if_minimums_overcommit()
        return sess

    def reserved_pages(self) -> int:
        """Pages the guaranteed minimums of the servings connected now add up to."""
        per: dict[str, int] = {}
        for s in self.sessions.values():
            slots_per_page = self.page_size // s.block_bytes
            need = -(-self.budgets[s.serving].min_slots // slots_per_page)
            per[s.serving] = max(per.get(s.serving, 0), need)
        return sum(per.values())

    def _warn_if_minimums_overcommit(self) -> None:
        # Registration still succeeds (refusing would stop an engine from serving
        # at all); the operator sees it in /stats and the log says which node.
        reserved = self.reserved_pages()
        if reserved > self.device.n_pages:
            log.warning(
                "guaranteed minimums add up to %d pages on node %s, which has %d: "
                "minimums cannot all be honoured under pressure",
                reserved,
                self.node,
                self.device.n_pages,
            )

    def close_session(self, sess: Session) -> None:
        """Release everything a session holds (its connection dropped, or it said bye)."""
        for key, n in list(sess.pins.items()):
            block = self.index.get(key)
            for _ in range(n):
                if block is not None and block.refs > 0:
                    self.index.unpin(block)
        sess.pins.clear()
        for slot in list(sess.leased):
            self._free_leased(sess, slot)
        self.claims.drop_session(sess.id)
        self.sessions.pop(sess.id, None)

    # ------------------------------------------------------------ lease / commit

    def lease(self, sess: Session, n: int, prefer: list[bytes] | None = None) -> list[Slot]:
        """``n`` free slots. ``prefer``: for an ``evict_own`` session, blocks of its
        own to drop first when it must make room under its max (a value it replaces)."""
        if n < 0:
            raise PoolError("cannot lease a negative number of blocks")
        serving = sess.serving
        over = self.usage[serving] + n - sess.budget.max_slots
        if over > 0 and sess.evict_own:
            from kvmarina.agent.node.blockops import evict_own  # blockops builds on this module

            evict_own(self, sess, over, prefer or [])
        if self.usage[serving] + n > sess.budget.max_slots:
            raise OverMax(
                f"serving {serving} holds {self.usage[serving]} blocks; {n} more "
                f"would exceed its max of {sess.budget.max_slots}"
            )
        pool = self.storage.slots(sess.scope, sess.block_bytes, "device")
        got: list[Slot] = []
        try:
            for _ in range(n):
                slot = pool.alloc() or tiers.reclaim_slot(self, sess, pool)
                got.append(slot)
                self.usage.lease(sess, slot)
        except PoolFull:
            for slot in got:
                self._free_leased(sess, slot)
            raise
        self.stats["leased"] += n
        return got

    def _free_leased(self, sess: Session, slot: Slot) -> None:
        self.usage.free(sess, slot)
        self.storage.slots(sess.scope, sess.block_bytes, "device").free(slot)

    def check_leased(self, sess: Session, slots: Iterable[Slot]) -> None:
        seen: set[Slot] = set()
        for slot in slots:
            if slot not in sess.leased:
                raise PoolError(f"slot {slot.page}/{slot.index} is not leased by this session")
            if slot in seen:
                raise PoolError(f"slot {slot.page}/{slot.index} is named twice")
            seen.add(slot)

    def release_slots(self, sess: Session, slots: list[Slot]) -> None:
        self.check_leased(sess, slots)
        for slot in slots:
            self._free_leased(sess, slot)

    def commit_many(
        self, sess: Session, items: list[tuple[Slot, bytes]], tag: bytes = b""
    ) -> list[Location]:
        """``commit`` each (slot, hash), all checked first; one ``stored`` event for
        the blocks that are new (a long prompt is one event, not thousands)."""
        self.check_leased(sess, [slot for slot, _ in items])
        locs, new, blocks = [], [], self.index.blocks
        for slot, h in items:
            if (sess.scope, h) not in blocks:
                new.append(h)
            locs.append(self.commit(sess, slot, h, publish=False, tag=tag))
        self.events.publish("stored", tuple(new), "device")
        return locs

    def commit(
        self,
        sess: Session,
        slot: Slot,
        block_hash: bytes,
        checksum: int | None = None,
        publish: bool = True,
        tag: bytes = b"",
    ) -> Location:
        """Make a written block shareable; pinned by the session until it releases.
        ``checksum``: the block's checksum, when the caller has just verified it.
        Else it is computed now, from the committed bytes, so that what a peer
        later receives is checked against the block as it was committed; in
        device memory (CUDA) only on first need, to spare a copy to the host
        for blocks that never move."""
        if slot not in sess.leased:
            raise PoolError(f"slot {slot.page}/{slot.index} is not leased by this session")
        key = (sess.scope, block_hash)
        if self.claims.owner:
            self.claims.settle(key)
        existing = self.index.blocks.get(key)
        if existing is not None:
            # Someone committed the same prefix first: keep theirs, use it, free ours.
            self._free_leased(sess, slot)
            self.pin(sess, existing)
            return Location(block_hash, existing.slot.page, existing.slot.index, existing.tier)
        size = sess.block_bytes
        self.usage.commit(sess, slot)
        block = Block(key, slot, size, sess.serving, "device", 0, 0, checksum, tag)
        if checksum is None and self.backend == "cpu":
            view = self.storage.cpu_view(sess.scope, "device")
            if view is None:
                self.checksum(block)
            else:  # the same bytes as ``host_view``, without its calls (a hot path)
                off = slot.page * self.page_size + slot.index * size
                block.checksum = self._checksum(view[off : off + size])
        self.index.insert(block)
        pins = sess.pins
        pins[key] = pins.get(key, 0) + 1
        self.stats["committed"] += 1
        if publish:
            self.events.publish("stored", (block_hash,), "device")
        return Location(block_hash, slot.page, slot.index, "device")

    # ------------------------------------------------------------ lookup / release

    def lookup(self, sess: Session, hashes: list[bytes]) -> list[Location]:
        """Longest cached run from block 0, pinned; host hits are brought back first."""
        return [
            Location(b.key[1], b.slot.page, b.slot.index, b.tier)
            for b in self.lookup_blocks(sess, hashes)
        ]

    def lookup_blocks(self, sess: Session, hashes: list[bytes]) -> list[Block]:
        """``lookup`` without building result objects (the socket path's hot loop)."""
        out = self.index.pin_prefix(sess.scope, hashes, sess.block_bytes)
        pins = sess.pins
        if len(out) > 4:
            pins.update(map(_KEY, out))  # counted in C
        else:
            for block in out:
                pins[block.key] = pins.get(block.key, 0) + 1
        if len(out) < len(hashes) and self.host_region is not None:
            self._lookup_on(sess, hashes, out)  # stopped at a host-tier hit, maybe
        stats = self.stats
        stats["lookups"] += 1
        stats["hit_blocks"] += len(out)
        stats["miss_blocks"] += len(hashes) - len(out)
        return out

    def _lookup_on(self, sess: Session, hashes: list[bytes], out: list[Block]) -> None:
        """The rest of a lookup past a run of device hits: pin each next hit, and
        promote those in host memory (which may move other blocks down)."""
        blocks, scope, size = self.index.blocks, sess.scope, sess.block_bytes
        for h in hashes[len(out) :]:
            block = blocks.get((scope, h))
            if block is None or block.block_bytes != size:
                break  # a miss, or the same hash under another layout: never mismatched bytes
            self.pin(sess, block)
            if block.tier == "host" and not tiers.promote(self, sess, block):
                break
            out.append(block)

    def in_flight(self, sess: Session, hashes: list[bytes], claim: bool) -> int:
        """How many of ``hashes`` (the blocks past a lookup's cached run), from the
        first, other engines of the node are computing now; with ``claim``, the
        rest that nobody computes become this session's to compute."""
        claims = self.claims
        if not claim and not claims.owner:
            return 0
        scope = sess.scope
        keys = [(scope, h) for h in hashes]
        pending = claims.pending(sess.id, keys)
        if claim:
            claims.claim(sess.id, keys[pending:])
        return pending

    def unclaim(self, sess: Session, hashes: list[bytes]) -> None:
        """This session will not compute these blocks after all (a sequence ended)."""
        if hashes:
            self.claims.unclaim(sess.id, [(sess.scope, h) for h in hashes])

    def pin(self, sess: Session, block: Block) -> None:
        """One more pin of ``block`` by ``sess``."""
        self.index.pin(block)
        pins = sess.pins
        pins[block.key] = pins.get(block.key, 0) + 1

    def unpin(self, sess: Session, block: Block) -> None:
        """One pin of ``block`` by ``sess`` fewer."""
        self.index.unpin(block)
        pins = sess.pins
        n = pins.get(block.key, 0) - 1
        if n > 0:
            pins[block.key] = n
        else:
            pins.pop(block.key, None)

    def release(self, sess: Session, hashes: list[bytes]) -> None:
        """Unpin blocks this session pinned (all-or-nothing: checked first; a hash
        named k times releases k pins)."""
        pins, scope = sess.pins, sess.scope
        keys = [(scope, h) for h in hashes]
        if len(set(keys)) == len(keys):
            for key in keys:
                if pins.get(key, 0) <= 0:
                    raise PoolError(f"block {key[1].hex()} is not pinned by this session")
            pop = pins.pop  # Counter's own __delitem__ is Python code: far slower
            for key in keys:
                n = pop(key) - 1
                if n:
                    pins[key] = n
        else:
            named = Counter(keys)
            for key, k in named.items():
                if pins.get(key, 0) < k:
                    raise PoolError(f"block {key[1].hex()} is not pinned {k} times by this session")
            for key, k in named.items():
                n = pins.pop(key) - k
                if n:
                    pins[key] = n
        self.index.unpin_keys(keys)

    # ------------------------------------------------------------ eviction

    def reclaim_targets(self, sess: Session, n: int) -> dict[int, int]:
        """Sessions to ask to release blocks so ``sess`` can lease ``n`` (``budgets``)."""
        return budgets.reclaim_targets(self, sess, n)

    def remove(
        self, block: Block, *, evicted: bool, publish: bool = True, slot_freed: bool = False
    ) -> None:
        """The one way a block leaves the pool: out of the index, its slot freed
        (``slot_freed``: the caller already gave it up), its owner's usage lowered
        if it was in the device tier.

        ``evicted``: the pool chose it to make room, counted in ``stats["evicted"]``
        and per tag (``tag_evictions``); else its owner dropped or replaced it, or
        an operator reset the pool, and the caller counts it as such. ``publish``:
        an ``evicted`` event for this block alone (callers that remove several
        publish one event for all). Callers remove unpinned blocks only, except a
        promotion whose bytes lost their host slot (the block is gone either way).
        """
        self.index.remove(block.key)
        if not slot_freed:
            self.storage.slots(block.key[0], block.block_bytes, block.tier).free(block.slot)
        if block.tier == "device":
            self.usage.block_out(block.owner)
        if evicted:
            self.stats["evicted"] += 1
            if block.tag:
                self.tag_evictions[block.key[0], block.tag] += 1
        if publish:
            self.events.publish("evicted", (block.key[1],))

    def checksum(self, block: Block) -> int:
        if block.checksum is None:
            block.checksum = self._checksum(self.host_view(block))
        return block.checksum

    # ------------------------------------------------------------ views

    def snapshot(self) -> dict[bytes, str]:
        return {key[1]: b.tier for key, b in self.index.blocks.items()}

    def clear(self) -> None:
        """Shutdown: subscribers learn that this boot's index is gone."""
        self.events.publish("cleared")

    def drop_unpinned(self) -> int:
        """Evict every unpinned block (an operator's or a benchmark's reset); pinned
        blocks stay. Publishes ``cleared`` when nothing is left, else ``evicted``.
        A reset, not the policy's choice: not counted in ``stats["evicted"]``."""
        victims = [b for b in self.index.blocks.values() if b.refs == 0]
        for block in victims:
            self.remove(block, evicted=False, publish=False)
        if not self.index.blocks:
            self.events.publish("cleared")
        else:
            self.events.publish("evicted", tuple(b.key[1] for b in victims))
        return len(victims)

    def stats_doc(self) -> AgentStats:
        """The pool as its ``/stats`` document (``kvmarina.agent_stats``)."""
        tiers = Counter(b.tier for b in self.index.blocks.values())
        return AgentStats(
            node=self.node,
            boot_id=self.events.boot_id,
            seq=self.events.seq,
            pages={
                # kept: free pages whose memory stays mapped for their last scope
                "device": TierPages(self.device.n_pages, self.device.used, self.device.kept),
                "host": TierPages(self.host.n_pages, self.host.used),
            },
            blocks={"device": tiers.get("device", 0), "host": tiers.get("host", 0)},
            sessions=len(self.sessions),
            claimed_blocks=len(self.claims),  # being computed by an engine now
            reserved_pages=self.reserved_pages(),
            usage=self.usage.as_dict(),
            counters=dict(self.stats),
            subscribers=len(self.events.subscribers),
            event_lag=self.events.lag(),
            resyncs=self.events.resyncs,
            extra={name: fn() for name, fn in self.extra_summary.items()},
        )

    def summary(self) -> dict[str, Any]:
        """``stats_doc`` as it goes on the wire."""
        return self.stats_doc().to_wire()

    def check_invariants(self) -> None:
        """Raise ``InvariantError`` naming the first invariant (class docstring) that
        does not hold (a full scan: ``invariants.check_pool``)."""
        check_pool(self)
