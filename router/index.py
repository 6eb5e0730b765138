"""The router's global block index: block hash -> which nodes hold it, in which tier.

Nodes get small integer *slots*; an entry is one int with bit ``2*slot`` set when
the node holds the block in device memory and bit ``2*slot+1`` when in host
memory. A node's whole contribution is dropped in O(1) by retiring its slot
(a snapshot, a resync, a ``cleared`` event, a node leaving the config): lookups
mask entries with the live slots, and ``sweep`` later scrubs retired bits in
bounded steps so the slot can be reused. This keeps the event loop responsive
with millions of entries.

Memory is bounded by ``max_blocks``: entries live in LRU order (a stored event
or a routing hit refreshes an entry) and the oldest is dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEVICE, HOST = "device", "host"


@dataclass(slots=True)
class PrefixMatch:
    """Per node: how many leading blocks of a prompt it holds, and how many of
    those sit in host memory. Invariant: ``host[n] <= run[n]``."""

    run: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)


class BlockIndex:
    """hash -> node/tier bitmask, LRU-capped.

    Invariants: ``len(self) <= max_blocks``; every live node has exactly one slot;
    a retired slot is reused only after ``sweep`` cleared its bits everywhere.
    """

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._entries: OrderedDict[bytes, int] = OrderedDict()
        self._slot_of: dict[str, int] = {}
        self._node_of: dict[int, str] = {}
        self._free: list[int] = []
        self._next_slot = 0
        self._retired: int = 0  # bitmask (both tier bits) of retired, unswept slots
        self._live: int = 0  # bitmask (both tier bits) of live slots
        self._sweep_iter: Iterable[bytes] | None = None
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

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
            self._live |= 3 << (2 * slot)
        return slot

    def drop_node(self, node: str) -> None:
        """Forget everything ``node`` holds (O(1); bits are scrubbed by ``sweep``)."""
        slot = self._slot_of.pop(node, None)
        if slot is None:
            return
        del self._node_of[slot]
        bits = 3 << (2 * slot)
        self._live &= ~bits
        self._retired |= bits
        self._sweep_iter = None  # restart: the new slot must be covered by a full pass

    def sweep(self, budget: int = 50_000) -> bool:
        """Scrub retired bits from up to ``budget`` entries; True when nothing is left."""
        if not self._retired:
            return True
        if self._sweep_iter is None:
            self._sweep_iter = iter(list(self._entries))
        keep = ~self._retired
        entries = self._entries
        for done, h in enumerate(self._sweep_iter, 1):
            v = entries.get(h)
            if v is not None:
                v &= keep
                if v:
                    entries[h] = v
                else:
                    del entries[h]
            if done >= budget:
                return False
        retired, self._retired, self._sweep_iter = self._retired, 0, None
        slot = 0
        while retired:
            if retired & 3:
                self._free.append(slot)
            retired >>= 2
            slot += 1
        return True

    # -- updates ------------------------------------------------------------
    def store(self, node: str, hashes: Iterable[bytes], tier: str) -> None:
        """``node`` now holds ``hashes`` in ``tier`` (a block has one home per node)."""
        slot = self._slot(node)
        clear = ~(3 << (2 * slot))
        bit = 1 << (2 * slot + (1 if tier == HOST else 0))
        entries = self._entries
        for h in hashes:
            v = entries.get(h)
            if v is None:
                entries[h] = bit
            else:
                entries[h] = (v & clear) | bit
                entries.move_to_end(h)
        self._trim()

    def evict(self, node: str, hashes: Iterable[bytes]) -> None:
        slot = self._slot_of.get(node)
        if slot is None:
            return
        clear = ~(3 << (2 * slot))
        entries = self._entries
        for h in hashes:
            v = entries.get(h)
            if v is not None:
                v &= clear
                if v & self._live:
                    entries[h] = v
                else:
                    del entries[h]

    def replace_node(self, node: str, blocks: dict[bytes, str]) -> None:
        """A snapshot: ``node`` holds exactly ``blocks`` (hash -> tier)."""
        self.drop_node(node)
        dev = [h for h, t in blocks.items() if t != HOST]
        host = [h for h, t in blocks.items() if t == HOST]
        self.store(node, dev, DEVICE)
        self.store(node, host, HOST)

    def _trim(self) -> None:
        over = len(self._entries) - self.max_blocks
        if over > 0:
            pop = self._entries.popitem
            for _ in range(over):
                pop(last=False)
            self.evictions += over

    # -- queries --------------------------------------------------------------
    def match(self, hashes: Sequence[bytes], touch: bool = True) -> PrefixMatch:
        """Longest run of leading blocks each node holds (any tier)."""
        out = PrefixMatch()
        entries = self._entries
        live = self._live
        alive = live  # pair-bits of nodes whose run is still unbroken
        get = entries.get
        i = 0
        host_bits_seen = 0
        host_counts: dict[int, int] = {}
        for h in hashes:
            v = get(h, 0) & alive
            # a node stays alive when it holds the block in either tier
            held = (v | (v >> 1)) & _EVEN_MASK
            held |= held << 1
            ended = alive & ~held
            if ended:
                self._record(out, ended, i, host_counts)
            alive &= held
            if not alive:
                break
            hb = v & _ODD_MASK
            if hb:
                host_bits_seen |= hb
                s = 0
                while hb:
                    if hb & 2:
                        host_counts[s] = host_counts.get(s, 0) + 1
                    hb >>= 2
                    s += 1
            if touch:
                entries.move_to_end(h)
            i += 1
        if alive:
            self._record(out, alive, i, host_counts)
        return out

    def _record(self, out: PrefixMatch, pair_bits: int, run: int, hosts: dict[int, int]) -> None:
        if run == 0:
            return
        s = 0
        while pair_bits:
            if pair_bits & 3:
                node = self._node_of.get(s)
                if node is not None:
                    out.run[node] = run
                    if s in hosts:
                        out.host[node] = hosts[s]
            pair_bits >>= 2
            s += 1

    def tiers(self, h: bytes) -> dict[str, str]:
        """node -> tier of one block (for tests and debugging)."""
        v = self._entries.get(h, 0) & self._live
        out: dict[str, str] = {}
        for node, slot in self._slot_of.items():
            bits = (v >> (2 * slot)) & 3
            if bits:
                out[node] = HOST if bits & 2 else DEVICE
        return out

    def node_blocks(self, node: str) -> dict[bytes, str]:
        """Every block ``node`` holds (O(index); for tests and convergence checks)."""
        slot = self._slot_of.get(node)
        if slot is None:
            return {}
        out = {}
        for h, v in self._entries.items():
            bits = (v >> (2 * slot)) & 3
            if bits:
                out[h] = HOST if bits & 2 else DEVICE
        return out


# Enough bits for 2**15 slots; Python ints are arbitrary precision so masks just truncate.
_EVEN_MASK = int("01" * 32768, 2)
_ODD_MASK = _EVEN_MASK << 1
