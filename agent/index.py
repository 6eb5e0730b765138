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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

Key = tuple[str, bytes]  # (scope key, block hash)


@dataclass(frozen=True, slots=True)
class Slot:
    """A block-sized place: page ``page``, ``index``-th block of that page."""

    page: int
    index: int


@dataclass(slots=True, eq=False)
class Block:
    """Invariants: ``refs >= 0``; ``tier`` is device or host; the block is in the
    index's eviction order exactly when ``refs == 0``."""

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
    """Unpinned keys, least recently used first.

    A plain dict keeps insertion order, and delete + re-insert is far cheaper
    than ``OrderedDict.move_to_end``/``pop`` on this hot path (measured ~20x).
    """

    def __init__(self) -> None:
        self._od: dict[Key, None] = {}
        # ``discard(key, None)``: ``remove`` without a Python-level call (hot loops)
        self.discard: Callable[[Key, None], object] = self._od.pop

    def add(self, key: Key, uses: int) -> None:
        self._od.pop(key, None)
        self._od[key] = None

    def remove(self, key: Key) -> None:
        if key in self._od:
            del self._od[key]

    def candidates(self) -> Iterator[Key]:
        """Lazily, oldest first: the caller stops before it changes the order."""
        return iter(self._od)

    def recency(self) -> Iterator[Key]:
        """Unpinned keys, least recently unpinned first (here: the order itself)."""
        return iter(self._od)

    def __len__(self) -> int:
        return len(self._od)


class LFUOrder:
    """Unpinned keys, fewest uses first (ties: least recently unpinned first).

    Buckets by use count; ``_min`` is a lower bound on the smallest non-empty bucket.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        self._count: dict[Key, int] = {}
        # when each key was last unpinned: recency across buckets (sessions that
        # evict their own blocks least recently used first, on an LFU node)
        self._tick: dict[Key, int] = {}
        self._clock = itertools.count()

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

    def __len__(self) -> int:
        return len(self._count)


@dataclass
class BlockIndex:
    """(scope, hash) -> Block. Pins go through ``pin``/``unpin`` only.

    Invariant: an unpinned block's key is in ``orders[block.tier]`` and in no
    other order; a pinned block's key is in none. One order per tier, so picking
    a device victim never walks past host-tier blocks.
    """

    policy: str = "lru"
    blocks: dict[Key, Block] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def make() -> LRUOrder | LFUOrder:
            return LFUOrder() if self.policy == "lfu" else LRUOrder()

        self.orders: dict[str, LRUOrder | LFUOrder] = {"device": make(), "host": make()}

    def get(self, key: Key) -> Block | None:
        return self.blocks.get(key)

    def insert(self, block: Block) -> None:
        """A new block, pinned once by its committer."""
        assert block.key not in self.blocks
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

    def __len__(self) -> int:
        return len(self.blocks)
