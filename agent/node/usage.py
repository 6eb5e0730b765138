"""Who holds the device tier's slots: leases per session, slots per serving.

Budgets (``Pool``'s min/max/priority) are counted in device slots a serving
holds. A serving holds a slot while one of its sessions leases it (an engine
is writing a block there) and while a device-tier block it committed lives
there. Host-tier blocks are not counted: offload gives the slot back, a
promotion takes one again.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator
from typing import Protocol

from kvmarina.agent.node.index import InvariantError, Slot


class Holder(Protocol):
    """What the table needs of a session: its serving and its leased slots."""

    @property
    def serving(self) -> str: ...

    @property
    def leased(self) -> set[Slot]: ...


class UsageTable:
    """Device slots held per serving (``namespace/serving``), and the leases behind them.

    Invariants (``Pool.check_invariants`` checks the ones that need the index):

    * every count is ``>= 0``;
    * a serving's count is the slots its sessions lease plus the device-tier
      blocks it owns: ``held[s] == sum(len(x.leased) for x of s) + |device blocks
      with owner s|``;
    * a slot is leased by at most one session, and a leased slot holds no block.

    Every change goes through one method: ``lease`` (a free slot handed to a
    session: +1), ``free`` (a leased slot given back unused: -1), ``commit`` (a
    leased slot becomes a block of the serving: the lease ends, the count stays),
    ``block_in`` / ``block_out`` (a block of the serving enters or leaves the device
    tier: promotion; offload or removal). A serving once counted stays listed at
    zero (``/stats`` shows every serving seen this boot).
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def __getitem__(self, serving: str) -> int:
        return self._held.get(serving, 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def items(self) -> ItemsView[str, int]:
        return self._held.items()

    def as_dict(self) -> dict[str, int]:
        return dict(self._held)

    def lease(self, holder: Holder, slot: Slot) -> None:
        holder.leased.add(slot)
        self._held[holder.serving] = self._held.get(holder.serving, 0) + 1

    def free(self, holder: Holder, slot: Slot) -> None:
        """A leased slot goes back unused (the caller frees it in its slot pool)."""
        holder.leased.remove(slot)
        self._sub(holder.serving)

    def commit(self, holder: Holder, slot: Slot) -> None:
        """The leased slot now holds a block the holder's serving owns."""
        holder.leased.remove(slot)

    def block_in(self, owner: str) -> None:
        self._held[owner] = self._held.get(owner, 0) + 1

    def block_out(self, owner: str) -> None:
        self._sub(owner)

    def _sub(self, serving: str) -> None:
        n = self._held.get(serving, 0)
        if n <= 0:
            raise InvariantError(f"serving {serving} would hold a negative number of slots")
        self._held[serving] = n - 1
