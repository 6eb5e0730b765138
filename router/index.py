"""The router's global block index: block hash -> which nodes hold it, in which tier.

Nodes get small integer *slots*; an entry is one int with bit ``slot`` set when
the node holds the block (any tier); a second, usually tiny, map keeps the same
kind of mask for blocks held in host memory. A lookup is then a C-level pass:
fetch every hash's mask, accumulate a running AND, and bisect that monotone
sequence for the length of each node's run. The running AND changes value at most
once per node it loses, so a lookup costs one bisect per distinct run length, never
a pass over every node (nor every pod): routing a prompt a few nodes hold is as cheap
with 1,000 nodes as with 8.

A node's whole contribution is dropped in O(1) by retiring its slot (a snapshot,
a resync, a ``cleared`` event, a node leaving the config): lookups mask entries
with the live slots, and ``sweep`` later scrubs retired bits in bounded steps so
the slot can be reused. This keeps the event loop responsive
with millions of entries.

Memory is bounded by ``max_blocks``: entries live in LRU order (a stored event
or a routing hit refreshes an entry) and the oldest is dropped first.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import accumulate, compress, repeat
from operator import and_, or_

DEVICE, HOST = "device", "host"


@dataclass(slots=True)
class PrefixMatch:
    """Per node: how many leading blocks of a prompt it holds, and how many of
    those sit in host memory. Invariant: ``host[n] <= run[n]``."""

    run: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)


class BlockIndex:
    """hash -> node bitmask (+ host-tier bitmask), LRU-capped.

    Invariants: ``len(self) <= max_blocks``; every live node has exactly one slot;
    ``_host`` keys are a subset of ``_held`` keys and their masks a subset of the
    held masks; a retired slot is reused only after ``sweep`` cleared its bits;
    ``_count[slot]`` of a live slot is the number of entries with its bit set.
    """

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._held: OrderedDict[bytes, int] = OrderedDict()
        self._host: dict[bytes, int] = {}
        self._slot_of: dict[str, int] = {}
        self._node_of: dict[int, str] = {}
        self._free: list[int] = []
        self._next_slot = 0
        self._retired = 0  # bitmask of retired, unswept slots
        self._live = 0  # bitmask of live slots
        self._sweep_iter: Iterator[bytes] | None = None
        self._count: dict[int, int] = {}  # slot -> entries with its bit (live slots)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def nodes(self) -> list[str]:
        return sorted(self._slot_of)

    # -- slots -------------------------------------------------------------
    def _slot(self, node: str) -> int:
        slot = self._slot_of.get(node)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot, self._next_slot = self._next_slot, self._next_slot + 1
            self._slot_of[node] = slot
            self._node_of[slot] = node
            self._live |= 1 << slot
            self._count[slot] = 0
        return slot

    def blocks_of(self, node: str) -> int:
        """How many blocks ``node`` holds (any tier; O(1))."""
        slot = self._slot_of.get(node)
        return 0 if slot is None else self._count[slot]

    def drop_node(self, node: str) -> None:
        """Forget everything ``node`` holds (O(1); bits are scrubbed by ``sweep``)."""
        slot = self._slot_of.pop(node, None)
        if slot is None:
            return
        del self._node_of[slot]
        del self._count[slot]
        self._live &= ~(1 << slot)
        self._retired |= 1 << slot
        self._sweep_iter = None  # restart: a full pass must cover this slot too

    def sweep(self, budget: int = 50_000) -> bool:
        """Scrub retired bits from up to ``budget`` entries; True when nothing is left."""
        if not self._retired:
            return True
        if self._sweep_iter is None:
            self._sweep_iter = iter(list(self._held))
        keep = ~self._retired
        held, host = self._held, self._host
        for done, h in enumerate(self._sweep_iter, 1):
            v = held.get(h)
            if v is not None:
                v &= keep
                if v:
                    held[h] = v
                else:
                    del held[h]
                hv = host.get(h)
                if hv is not None:
                    hv &= keep & (v or 0)
                    if hv:
                        host[h] = hv
                    else:
                        del host[h]
            if done >= budget:
                return False
        retired, self._retired, self._sweep_iter = self._retired, 0, None
        self._free.extend(s for s in range(retired.bit_length()) if retired >> s & 1)
        return True

    # -- updates ------------------------------------------------------------
    def store(self, node: str, hashes: Iterable[bytes], tier: str) -> None:
        """``node`` now holds ``hashes`` in ``tier`` (a block has one home per node)."""
        slot = self._slot(node)
        bit = 1 << slot
        held, host = self._held, self._host
        get, mte = held.get, held.move_to_end
        added = 0
        for h in hashes:
            v = get(h)
            if v is None:
                held[h] = bit
                added += 1
            else:
                if not v & bit:
                    held[h] = v | bit
                    added += 1
                mte(h)
            if tier == HOST:
                host[h] = host.get(h, 0) | bit
            elif host:
                hv = host.get(h)
                if hv is not None:
                    hv &= ~bit
                    if hv:
                        host[h] = hv
                    else:
                        del host[h]
        self._count[slot] += added
        self._trim()

    def evict(self, node: str, hashes: Iterable[bytes]) -> None:
        slot = self._slot_of.get(node)
        if slot is None:
            return
        bit = 1 << slot
        clear = ~bit
        held, host, live = self._held, self._host, self._live
        removed = 0
        for h in hashes:
            v = held.get(h)
            if v is None or not v & bit:
                continue
            removed += 1
            v &= clear
            if v & live:
                held[h] = v
            else:
                del held[h]
                v = 0
            hv = host.get(h)
            if hv is not None:
                hv &= v
                if hv:
                    host[h] = hv
                else:
                    del host[h]
        self._count[slot] -= removed

    def replace_node(self, node: str, blocks: dict[bytes, str]) -> None:
        """A snapshot: ``node`` holds exactly ``blocks`` (hash -> tier)."""
        self.drop_node(node)
        self.store(node, [h for h, t in blocks.items() if t != HOST], DEVICE)
        self.store(node, [h for h, t in blocks.items() if t == HOST], HOST)

    def _trim(self) -> None:
        over = len(self._held) - self.max_blocks
        if over > 0:
            pop, host, count, live = self._held.popitem, self._host, self._count, self._live
            for _ in range(over):
                h, v = pop(last=False)
                if host:
                    host.pop(h, None)
                for slot in _slots(v & live):
                    count[slot] -= 1
            self.evictions += over

    # -- queries --------------------------------------------------------------
    def match(self, hashes: Sequence[bytes], touch: bool = False) -> PrefixMatch:
        """Longest run of leading blocks each node holds (any tier)."""
        if not hashes or not self._live:
            return PrefixMatch({}, {})
        running = self._running(hashes)
        cur = running[0]
        if not cur:
            return PrefixMatch({}, {})
        node_of = self._node_of
        n = len(running)
        if running[-1] == cur:  # whoever holds block 0 holds all of them
            longest = n
            if cur & (cur - 1):
                out = PrefixMatch(dict.fromkeys([node_of[s] for s in _slots(cur)], n), {})
            else:
                out = PrefixMatch({node_of[cur.bit_length() - 1]: n}, {})
        else:
            # ``running`` only ever loses bits: find where it changes, and the nodes
            # whose bits went there have a run of exactly that many blocks
            by_slot: dict[int, int] = {}
            pos = 0
            while cur:
                j = n if running[-1] == cur else bisect_left(running, True, pos + 1, key=cur.__ne__)
                nxt = running[j] if j < n else 0
                for slot in _slots(cur & ~nxt):
                    by_slot[slot] = j
                cur, pos = nxt, j
            out = PrefixMatch({node_of[s]: by_slot[s] for s in sorted(by_slot)}, {})
            longest = max(by_slot.values())
        if self._host:
            self._count_host(hashes[:longest], out)
        if touch:
            self.touch(hashes[:longest])
        return out

    def touch(self, hashes: Sequence[bytes]) -> None:
        """Refresh the LRU position of the indexed ones among ``hashes``."""
        held = self._held
        mte = held.move_to_end
        for h in hashes:
            if h in held:
                mte(h)

    def _running(self, hashes: Sequence[bytes]) -> list[int]:
        """Running AND of the masks of ``hashes`` with the live slots, stopped soon after
        no live node is left.

        Lookups in a dictionary of millions of entries miss the CPU cache, so they are
        done in doubling batches and stop once no node's run can grow any further (a
        decision asks for little more than the held prefix: one batch, as a rule)."""
        get, step = self._held.get, 32
        running = list(accumulate(map(get, hashes[:step], repeat(0)), and_, initial=self._live))
        del running[0]
        start = step
        while start < len(hashes) and running[-1]:
            step *= 2
            part = list(
                accumulate(
                    map(get, hashes[start : start + step], repeat(0)), and_, initial=running[-1]
                )
            )
            del part[0]
            running += part
            start += step
        return running

    def _count_host(self, hashes: Sequence[bytes], out: PrefixMatch) -> None:
        """Per node, how many blocks of its run sit in host memory (sparse, C-level scans)."""
        vals = list(map(self._host.get, hashes, repeat(0)))
        where = list(compress(range(len(vals)), vals))
        if not where:
            return
        host = list(compress(vals, vals))  # the non-zero masks, in block order
        any_host = reduce(or_, host)
        for node, run in out.run.items():
            bit = 1 << self._slot_of[node]
            if any_host & bit:
                k = bisect_left(where, run)  # host blocks inside the node's run
                n = k - list(map(and_, host[:k], repeat(bit))).count(0)
                if n:
                    out.host[node] = n

    def tiers(self, h: bytes) -> dict[str, str]:
        """node -> tier of one block (for tests and debugging)."""
        v = self._held.get(h, 0) & self._live
        hv = self._host.get(h, 0)
        return {
            node: (HOST if hv >> slot & 1 else DEVICE)
            for node, slot in self._slot_of.items()
            if v >> slot & 1
        }

    def node_blocks(self, node: str) -> dict[bytes, str]:
        """Every block ``node`` holds (O(index); for tests and convergence checks)."""
        slot = self._slot_of.get(node)
        if slot is None:
            return {}
        bit = 1 << slot
        return {
            h: (HOST if self._host.get(h, 0) & bit else DEVICE)
            for h, v in self._held.items()
            if v & bit
        }


def any_holds(indexes: Iterable[BlockIndex], h: bytes) -> bool:
    """Whether a live node of any of ``indexes`` holds block ``h``."""
    return any(idx._held.get(h, 0) & idx._live for idx in indexes)


def _slots(mask: int) -> Iterator[int]:
    """The set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
