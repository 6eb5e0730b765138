"""The content index of KV blocks, with pins and an eviction order.

A block is named by (scope key, contract hash): two scopes never see each
other's blocks, even for equal hashes. Each block has one home on the node
(a slot in the device tier, or in the host tier) and a reference count: the
number of running requests that use it. Only unreferenced blocks are in the
eviction order, so a block in use can never be chosen as a victim.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

Key = tuple[str, bytes]  # (scope key, block hash)
TIERS = ("device", "host")


class InvariantError(AssertionError):
    """A structure of the pool is inconsistent (``check`` / ``check_invariants``)."""


@dataclass(frozen=True, slots=True)
class Slot:
    """A block-sized place: page ``page``, ``index``-th block of that page."""

    page: int
    index: int


@dataclass(slots=True, eq=False)
class Block:
    """One block of KV in the node's pool.

    Invariants: ``refs >= 0`` (running requests, and transfers, using it);
    ``uses >= refs``; ``tier`` is device or host and ``slot`` a slot of that
    tier's slot pool for (scope, ``block_bytes``); the block is in the index's
    eviction order of its tier exactly when ``refs == 0``; ``refs``, ``uses`` and
    ``tier`` change only through ``BlockIndex``.
    """

    key: Key
    slot: Slot
    block_bytes: int
    owner: str
    tier: str = "device"
    refs: int = 0
    uses: int = 0
    checksum: int | None = None  # the pool's checksum of the bytes (at commit, or first need)
    tag: bytes = b""  # a label the committer chose (tensor caches count their values by it)


class LRUOrder:
    """Unpinned keys, least recently unpinned first.

    Invariant: each key at most once. A plain dict keeps insertion order, and
    delete + re-insert is far cheaper than ``OrderedDict.move_to_end``/``pop`` on
    this hot path (measured ~20x). Values are the keys' use counts (unused here).
    """

    def __init__(self) -> None:
        self._od: dict[Key, int] = {}
        # ``discard(key, None)``: ``remove`` without a Python-level call (hot loops)
        self.discard: Callable[[Key, None], object] = self._od.pop
        # ``push(key, uses)``: ``add`` of a key known to be absent (an unpinned
        # block: a pinned block's key is in no order), without a Python-level call
        self.push: Callable[[Key, int], object] = self._od.__setitem__

    def add(self, key: Key, uses: int) -> None:
        self._od.pop(key, None)
        self._od[key] = uses

    def remove(self, key: Key) -> None:
        if key in self._od:
            del self._od[key]

    def candidates(self) -> Iterator[Key]:
        """Lazily, oldest first: the caller stops before it changes the order."""
        return iter(self._od)

    def recency(self) -> Iterator[Key]:
        """Unpinned keys, least recently unpinned first (here: the order itself)."""
        return iter(self._od)

    def __contains__(self, key: object) -> bool:
        return key in self._od

    def __len__(self) -> int:
        return len(self._od)


class LFUOrder:
    """Unpinned keys, fewest uses first (ties: least recently unpinned first).

    Buckets by use count; ``_count`` and ``_tick`` hold exactly the keys of the
    buckets (each key in the bucket of its count); no bucket is empty.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        self._count: dict[Key, int] = {}
        # when each key was last unpinned: recency across buckets (sessions that
        # evict their own blocks least recently used first, on an LFU node)
        self._tick: dict[Key, int] = {}
        self._clock = itertools.count()
        self.push: Callable[[Key, int], object] = self.add

    def add(self, key: Key, uses: int) -> None:
        self.remove(key)
        self._buckets.setdefault(uses, OrderedDict())[key] = None
        self._count[key] = uses
        self._tick[key] = next(self._clock)

    def remove(self, key: Key) -> None:
        uses = self._count.pop(key, None)
        if uses is not None:
            del self._tick[key]
            bucket = self._buckets[uses]
            bucket.pop(key, None)
            if not bucket:
                del self._buckets[uses]

    def discard(self, key: Key, _default: None = None) -> None:
        self.remove(key)

    def candidates(self) -> Iterator[Key]:
        """Lazily, fewest uses first: the caller stops before it changes the order."""
        for uses in sorted(self._buckets):
            yield from self._buckets.get(uses, ())

    def recency(self) -> Iterator[Key]:
        """Unpinned keys, least recently unpinned first (sorted: not a hot path)."""
        return iter(sorted(self._tick, key=self._tick.__getitem__))

    def __contains__(self, key: object) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)

    def check(self) -> None:
        in_buckets = {k: u for u, b in self._buckets.items() for k in b}
        if in_buckets != self._count or self._tick.keys() != self._count.keys():
            raise InvariantError("LFU buckets, counts and ticks disagree")
        if not all(self._buckets.values()):
            raise InvariantError("an empty LFU bucket was kept")


@dataclass
class BlockIndex:
    """(scope, hash) -> Block, with pins and one eviction order per tier.

    Invariants (``check``): each block is stored under its own key; an unpinned
    block's key is in ``orders[block.tier]`` and in no other order, a pinned
    block's key is in none, and the orders hold no other keys. So a block in
    use is never a victim, and picking a device victim never walks past
    host-tier blocks.

    A block's ``refs``, ``uses`` and ``tier`` change here only: ``insert`` (pinned
    once by its committer), ``pin``/``unpin`` (one block), ``pin_prefix`` and
    ``unpin_keys`` (many in one pass: the lookup and release hot paths), ``move``
    and ``remove``.
    """

    policy: str = "lru"
    blocks: dict[Key, Block] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def make() -> LRUOrder | LFUOrder:
            return LFUOrder() if self.policy == "lfu" else LRUOrder()

        self.orders: dict[str, LRUOrder | LFUOrder] = {tier: make() for tier in TIERS}

    def get(self, key: Key) -> Block | None:
        return self.blocks.get(key)

    def insert(self, block: Block) -> None:
        """A new block, pinned once by its committer."""
        if block.key in self.blocks:
            raise InvariantError(f"block {block.key[1].hex()} is already indexed")
        block.refs = 1
        block.uses = 1
        self.blocks[block.key] = block

    def pin(self, block: Block) -> None:
        if block.refs == 0:
            self.orders[block.tier].remove(block.key)
        block.refs += 1
        block.uses += 1

    def unpin(self, block: Block) -> None:
        if block.refs <= 0:
            raise ValueError(f"block {block.key[1].hex()} is not pinned")
        block.refs -= 1
        if block.refs == 0 and block.key in self.blocks:
            self.orders[block.tier].add(block.key, block.uses)

    def pin_prefix(self, scope: str, hashes: Iterable[bytes], block_bytes: int) -> list[Block]:
        """Pin the longest run of consecutive device-tier blocks of ``hashes`` from
        the first: the lookup's hot loop. The run stops at a miss, at a block of
        another size (never mismatched bytes) or at a host-tier block (the caller
        pins and promotes those one by one)."""
        get, discard = self.blocks.get, self.orders["device"].discard
        out: list[Block] = []
        append = out.append
        for key in zip(itertools.repeat(scope), hashes):
            block = get(key)
            if block is None or block.block_bytes != block_bytes or block.tier != "device":
                break
            if not block.refs:
                discard(block.key, None)  # the stored key: found by identity
            block.refs += 1
            block.uses += 1
            append(block)
        return out

    def unpin_keys(self, keys: Iterable[Key]) -> None:
        """Unpin the block of each key once (a key named k times: k times): the
        release's hot loop. The caller has checked its pins; a key whose block is
        gone is skipped."""
        orders = self.orders
        push_device, push_host = orders["device"].push, orders["host"].push
        for block in map(self.blocks.get, keys):
            if block is not None:
                block.refs -= 1
                if not block.refs:
                    (push_device if block.tier == "device" else push_host)(block.key, block.uses)

    def move(self, block: Block, tier: str) -> None:
        """The block now lives in ``tier`` (its slot already changed by the caller)."""
        if block.refs == 0:
            self.orders[block.tier].remove(block.key)
            self.orders[tier].add(block.key, block.uses)
        block.tier = tier

    def remove(self, key: Key) -> Block:
        block = self.blocks.pop(key)
        self.orders[block.tier].remove(key)
        return block

    def longest_prefix(self, scope: str, hashes: list[bytes]) -> list[Block]:
        """Consecutive hits from block 0 (not pinned here)."""
        out = []
        for h in hashes:
            block = self.blocks.get((scope, h))
            if block is None:
                break
            out.append(block)
        return out

    def victims(self, tier: str) -> Iterator[Block]:
        """Unpinned blocks of ``tier``, best victim first. Lazy: take what you need,
        then change the index (never while still iterating)."""
        for key in self.orders[tier].candidates():
            block = self.blocks.get(key)
            if block is not None and block.refs == 0:
                yield block

    def recency(self, tier: str) -> Iterator[Key]:
        """Keys of ``tier``'s unpinned blocks, least recently unpinned first (lazy,
        like ``victims``)."""
        return self.orders[tier].recency()

    def check(self) -> None:
        """Raise ``InvariantError`` where an invariant above does not hold."""
        unpinned: dict[str, set[Key]] = {tier: set() for tier in TIERS}
        for key, block in self.blocks.items():
            if block.key != key:
                raise InvariantError(f"block {block.key[1].hex()} is filed under another key")
            if block.tier not in unpinned:
                raise InvariantError(f"block {key[1].hex()} is in tier {block.tier!r}")
            if block.refs < 0 or block.uses < block.refs:
                raise InvariantError(f"block {key[1].hex()}: refs {block.refs}, uses {block.uses}")
            if block.refs == 0:
                unpinned[block.tier].add(key)
        for tier, order in self.orders.items():
            keys = set(order.candidates())
            if len(keys) != len(order) or keys != unpinned[tier]:
                raise InvariantError(
                    f"the {tier} eviction order holds {len(order)} keys for "
                    f"{len(unpinned[tier])} unpinned {tier} blocks "
                    f"({len(keys ^ unpinned[tier])} differ)"
                )
            if isinstance(order, LFUOrder):
                order.check()

    def __len__(self) -> int:
        return len(self.blocks)
