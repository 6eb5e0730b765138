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
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kvmarina.agent.memory import CpuRegion, Region, make_region
from kvmarina.agent.node import checksums
from kvmarina.agent.node.claims import ClaimTable
from kvmarina.agent.node.credentials import Identity
from kvmarina.agent.node.index import TIERS, Block, BlockIndex, InvariantError, Key, Slot
from kvmarina.agent.node.slots import FreePages, SlotPool
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


class PoolError(ValueError):
    """A request the pool refuses; the message says why."""


class PoolFull(PoolError):
    """No slot can be had within the budgets right now."""


class OverMax(PoolFull):
    """The serving's own maximum forbids it: asking others to release cannot help."""


@dataclass(frozen=True, slots=True)
class Budget:
    min_slots: int = 0
    max_slots: int = 1 << 40
    priority: int = 100


@dataclass(eq=False)
class Session:
    """One registered engine connection.

    Invariants: ``leased`` holds slots allocated to this session and not yet
    committed or freed (changed through the pool's ``UsageTable`` only);
    ``pins`` counts this session's references per key, every count ``> 0``, and
    each key's block holds at least the pins of all sessions together
    (``Block.refs``; transfers pin too).
    """

    id: int
    ident: Identity
    block_bytes: int
    budget: Budget
    leased: set[Slot] = field(default_factory=set)
    pins: Counter[Key] = field(default_factory=Counter)
    scope: str = ""
    # "lru" | "lfu": a lease past the serving's max first drops the serving's own
    # unpinned device blocks in that order (tensor caches); "" refuses (engines)
    evict_own: str = ""
    serving: str = ""  # ``ident.key``: its budget's and usage's name

    def __post_init__(self) -> None:
        self.scope = self.ident.scope_key
        self.serving = self.ident.key


class Location(NamedTuple):
    """Where a block lives: its hash, page, index in the page and tier (immutable)."""

    hash: bytes
    page: int
    index: int  # type: ignore[assignment]  # shadows tuple.index: unused here
    tier: str

    def offset(self, page_size: int, block_bytes: int) -> int:
        return self.page * page_size + self.index * block_bytes


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
        self.device = FreePages(device_pages, self._drop_page)
        self.host = FreePages(host_pages)  # one region for every scope: never dropped
        self.index = BlockIndex(policy)
        self.claims = ClaimTable()
        self.regions: dict[str, Region] = {}
        self.host_region: CpuRegion | None = (
            CpuRegion(f"{node}-host", host_pages * page_size) if host_pages else None
        )
        self._slot_pools: dict[tuple[str, int, str], SlotPool] = {}
        # (scope, tier) -> the region's bytes, where it is shared RAM (else None)
        self._views: dict[tuple[str, str], memoryview | None] = {}
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

    def region(self, scope: str) -> Region:
        if scope not in self.regions:
            self.regions[scope] = make_region(
                self.backend,
                f"{self.node}-{scope}".replace("/", "-"),
                self.device.n_pages * self.page_size,
            )
        return self.regions[scope]

    def _slots(self, scope: str, block_bytes: int, tier: str) -> SlotPool:
        key = (scope, block_bytes, tier)
        if key not in self._slot_pools:
            pages = self.device if tier == "device" else self.host
            per_page = self.page_size // block_bytes
            if per_page < 1:
                raise PoolError(
                    f"a block of {block_bytes} bytes does not fit a page of "
                    f"{self.page_size} bytes; raise the pool's pageSize"
                )
            if tier == "device":
                self.region(scope)  # made before the first page is written
            self._slot_pools[key] = SlotPool(pages, per_page, scope if tier == "device" else "")
        return self._slot_pools[key]

    def _drop_page(self, scope: str, page: int) -> None:
        """A free device page moves to another scope: its memory in ``scope``'s region
        goes back first (a memfd reads zeros there from then on)."""
        region = self.regions.get(scope)
        if region is not None:
            region.release(page * self.page_size, self.page_size)

    def _bytes(self, scope: str, tier: str, slot: Slot, block_bytes: int) -> torch.Tensor:
        region = self.region(scope) if tier == "device" else self.host_region
        assert region is not None
        off = slot.page * self.page_size + slot.index * block_bytes
        return region.tensor()[off : off + block_bytes]

    def _cpu_view(self, scope: str, tier: str) -> memoryview | None:
        """The whole region of ``scope`` in ``tier`` as bytes when it is shared RAM
        (made once; slicing it costs far less than slicing a tensor), else None."""
        key = (scope, "device") if tier == "device" else ("", "host")
        if key not in self._views:
            region = self.region(scope) if tier == "device" else self.host_region
            self._views[key] = region.view() if isinstance(region, CpuRegion) else None
        return self._views[key]

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
        pool = self._slots(sess.scope, sess.block_bytes, "device")
        got: list[Slot] = []
        try:
            for _ in range(n):
                slot = pool.alloc() or self._reclaim_for(sess, pool)
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
        self._slots(sess.scope, sess.block_bytes, "device").free(slot)

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
            self._pin(sess, existing)
            return Location(block_hash, existing.slot.page, existing.slot.index, existing.tier)
        size = sess.block_bytes
        self.usage.commit(sess, slot)
        block = Block(key, slot, size, sess.serving, "device", 0, 0, checksum, tag)
        if checksum is None and self.backend == "cpu":
            view = self._cpu_view(sess.scope, "device")
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
            self._pin(sess, block)
            if block.tier == "host" and not self._promote(sess, block):
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

    def _pin(self, sess: Session, block: Block) -> None:
        self.index.pin(block)
        pins = sess.pins
        pins[block.key] = pins.get(block.key, 0) + 1

    def _unpin(self, sess: Session, block: Block) -> None:
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

    # ------------------------------------------------------------ eviction and tiers

    def _may_evict(self, requester: Session, block: Block) -> bool:
        return self._may_take_from(requester, block.owner)

    def _may_take_from(self, requester: Session, owner: str) -> bool:
        """May ``requester`` take a block that ``owner`` holds, by the budgets?"""
        me = requester.serving
        if owner == me:
            return True
        ob = self.budgets.get(owner, Budget())
        if self.usage[owner] <= ob.min_slots:
            return False  # the owner's guaranteed minimum
        if self.usage[me] < requester.budget.min_slots:
            return True  # getting back to my own guaranteed minimum
        return ob.priority <= requester.budget.priority

    def reclaim_targets(self, sess: Session, n: int) -> dict[int, int]:
        """Sessions to ask to release blocks so that ``sess`` can lease ``n``:
        session id -> how many to ask for. Only holders the budgets let ``sess``
        take from, lowest priority first; blocks another session also pins are
        not counted (releasing them would free nothing)."""
        asked: dict[int, int] = {}
        # Any scope: pages are shared by all scopes, and a page another scope
        # empties comes back to the free queue for ours.
        others = [s for s in self.sessions.values() if s.id != sess.id]
        others.sort(key=lambda s: self.budgets.get(s.serving, Budget()).priority)
        want = n
        for other in others:
            if want <= 0:
                break
            if not self._may_take_from(sess, other.serving):
                continue
            held = len(other.leased) + sum(
                1
                for key, k in other.pins.items()
                if (b := self.index.get(key)) is not None and b.tier == "device" and b.refs == k
            )
            if held:
                asked[other.id] = min(held, want)
                want -= asked[other.id]
        return asked

    def _reclaim_for(self, sess: Session, pool: SlotPool) -> Slot:
        """Free a device slot usable by ``pool`` by moving or dropping a victim."""
        for _ in range(64):  # each round frees one block; pages free when emptied
            victim = next(
                (b for b in self.index.victims("device") if self._may_evict(sess, b)),
                None,
            )
            if victim is None:
                break
            self._evict(victim)
            slot = pool.alloc()
            if slot is not None:
                return slot
        raise PoolFull(
            f"no free KV block for serving {sess.serving}: every block is "
            "in use by running requests or protected by budgets"
        )

    def _evict(self, block: Block) -> None:
        """Make room in the device tier: move ``block`` (unpinned) to host memory,
        dropping host victims for room; with no host tier or no room, remove it."""
        scope, h = block.key
        if self.host_region is not None:
            host = self._slots(scope, block.block_bytes, "host")
            hslot = host.alloc()
            for _ in range(64):  # host full: drop host victims until a slot frees
                if hslot is not None:
                    break
                hvictim = next(self.index.victims("host"), None)
                if hvictim is None:
                    break
                self.remove(hvictim, evicted=True)
                hslot = host.alloc()
            if hslot is not None:
                self._copy(
                    self._bytes(scope, "device", block.slot, block.block_bytes),
                    self._bytes(scope, "host", hslot, block.block_bytes),
                )
                self._slots(scope, block.block_bytes, "device").free(block.slot)
                self.usage.block_out(block.owner)  # budgets count device-tier blocks only
                block.slot = hslot
                self.index.move(block, "host")
                self.stats["offloaded"] += 1
                self.events.publish("moved", (h,), "host")
                return
        self.remove(block, evicted=True)

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
            self._slots(block.key[0], block.block_bytes, block.tier).free(block.slot)
        if block.tier == "device":
            self.usage.block_out(block.owner)
        if evicted:
            self.stats["evicted"] += 1
            if block.tag:
                self.tag_evictions[block.key[0], block.tag] += 1
        if publish:
            self.events.publish("evicted", (block.key[1],))

    def host_view(self, block: Block) -> memoryview:
        """A block's bytes readable on the CPU: a view of shared RAM, or a copy
        out of device memory on CUDA."""
        scope, size = block.key[0], block.block_bytes
        view = self._cpu_view(scope, block.tier)
        if view is not None:
            off = block.slot.page * self.page_size + block.slot.index * size
            return view[off : off + size]
        data = self._bytes(scope, block.tier, block.slot, size)
        if data.device.type != "cpu":
            data = data.cpu()
        return data.numpy().data

    def checksum(self, block: Block) -> int:
        if block.checksum is None:
            block.checksum = self._checksum(self.host_view(block))
        return block.checksum

    def write_block(self, scope: str, slot: Slot, size: int, data: bytes) -> None:
        """Fill a leased device slot from bytes received on the CPU (a pulled block)."""
        dst = self._bytes(scope, "device", slot, size)
        if dst.device.type == "cpu":
            dst.numpy()[:] = memoryview(data).cast("B")
        else:
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move one block's bytes between tiers. On CUDA through the kernels'
        block copy (one row each side); shared RAM is a plain memory copy."""
        if self.backend == "cuda":
            from kvmarina.kernels.dispatch import copy_blocks

            zero = torch.zeros(1, dtype=torch.int64)
            copy_blocks(src.view(1, -1), dst.view(1, -1), zero.to(src.device), zero.to(dst.device))
        else:
            dst.copy_(src)

    def _promote(self, sess: Session, block: Block) -> bool:
        """Copy a host-tier block the lookup has just pinned back into the device tier.

        With the device full, a victim must move down to host memory just as
        this block leaves it: the block's bytes are staged first so the victim
        can take its host slot (a swap), instead of pushing a third block out.
        On failure (False) the lookup's pin is released here."""
        scope, size = block.key[0], block.block_bytes
        pool, host = self._slots(scope, size, "device"), self._slots(scope, size, "host")
        src = self._bytes(scope, "host", block.slot, size)
        slot = pool.alloc()
        if slot is not None:
            self._copy(src, self._bytes(scope, "device", slot, size))
            host.free(block.slot)
        else:
            staged = src.clone()
            host.free(block.slot)
            try:
                slot = self._reclaim_for(sess, pool)
            except PoolFull:
                self._back_to_host(sess, block, staged)
                return False
            self._copy(staged, self._bytes(scope, "device", slot, size))
        block.slot = slot
        self.index.move(block, "device")  # pinned by the lookup: no order to change
        self.usage.block_in(block.owner)
        self.stats["promoted"] += 1
        self.events.publish("moved", (block.key[1],), "device")
        return True

    def _back_to_host(self, sess: Session, block: Block, staged: torch.Tensor) -> None:
        """A promotion that found no device room: put the staged bytes back in
        host memory (or, if a victim took the last host slot, remove the block),
        and release the lookup's pin."""
        scope = block.key[0]
        hslot = self._slots(scope, block.block_bytes, "host").alloc()
        self._unpin(sess, block)
        if hslot is None:
            self.remove(block, evicted=True, slot_freed=True)
        else:
            self._bytes(scope, "host", hslot, block.block_bytes).copy_(staged)
            block.slot = hslot

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

    # ------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Raise ``InvariantError`` naming the first invariant (class docstring) that
        does not hold. A full scan: for tests and debugging, not hot paths."""
        self.index.check()
        tiers = {"device": self.device, "host": self.host}
        held: dict[str, set[int]] = {tier: set() for tier in TIERS}
        for (_, _, tier), sp in self._slot_pools.items():
            sp.check()
            if held[tier] & sp.used.keys():
                raise InvariantError(f"a {tier} page is held by two slot pools")
            held[tier].update(sp.used)
        for tier, pages in tiers.items():
            pages.check()
            if held[tier] != pages.handed_out():
                raise InvariantError(f"{tier} pages handed out and pages cut into slots differ")

        # every allocated slot is exactly one block's or one lease's
        taken: dict[tuple[str, int, str], dict[Slot, str]] = {}

        def take(where: tuple[str, int, str], slot: Slot, who: str) -> None:
            mine = taken.setdefault(where, {})
            if slot in mine:
                raise InvariantError(f"slot {slot} is both {mine[slot]}'s and {who}'s")
            mine[slot] = who

        usage: dict[str, int] = {}
        for key, b in self.index.blocks.items():
            take((key[0], b.block_bytes, b.tier), b.slot, f"block {key[1].hex()}")
            if b.tier == "device":
                usage[b.owner] = usage.get(b.owner, 0) + 1
        pinned: dict[Key, int] = {}
        for s in self.sessions.values():
            for slot in s.leased:
                take((s.scope, s.block_bytes, "device"), slot, f"session {s.id}'s lease")
            usage[s.serving] = usage.get(s.serving, 0) + len(s.leased)
            for key, n in s.pins.items():
                if n <= 0 or key not in self.index.blocks:
                    raise InvariantError(f"session {s.id} pins {key[1].hex()} {n} times")
                pinned[key] = pinned.get(key, 0) + n
        for where in taken.keys() | self._slot_pools.keys():
            pool = self._slot_pools.get(where)
            allocated = pool.allocated() if pool is not None else set()
            if allocated != taken.get(where, {}).keys():
                raise InvariantError(
                    f"{where[2]} slots of {where[0]}: allocated and held by a block "
                    "or a lease differ (a leak, or a slot used twice)"
                )

        for serving in usage.keys() | set(self.usage):
            if self.usage[serving] != usage.get(serving, 0):
                raise InvariantError(
                    f"usage of {serving} is {self.usage[serving]}; "
                    f"it leases and owns {usage.get(serving, 0)}"
                )
        for key, n in pinned.items():
            if self.index.blocks[key].refs < n:
                raise InvariantError(f"block {key[1].hex()} has fewer refs than session pins")

        claims = self.claims
        flat = {k: sid for sid, ks in claims.by_session.items() for k in ks}
        if flat != claims.owner or not all(claims.by_session.values()):
            raise InvariantError("the claim table's two maps disagree")
        if not claims.by_session.keys() <= self.sessions.keys():
            raise InvariantError("a closed session still claims blocks")
