"""Pages and the block slots cut from them.

A tier has ``n_pages`` pages. A page in use belongs to exactly one
(scope, block size) pair and is cut into ``page_size // block_bytes`` slots;
when its last slot is freed the page returns to the tier's free pages, its
memory kept for the same scope's next use; the same page index can next serve
another scope, whose region gets it only after the first one gave it back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmarina.agent.node.index import InvariantError, Slot


class FreePages:
    """A tier's page indices, free or handed out, and where each page's memory lives.

    Each scope has its own region, all indexed by the same page numbers. A freed
    page keeps its memory in the region that used it (its *home*): taking it
    again for that home costs nothing, where punching it out on every free made
    each reuse fault in and zero fresh memory. A page goes to another home only
    once it has none free of its own and no page is bare; then ``drop(old_home,
    page)`` gives the old region's copy back first, so no scope ever reads
    another's bytes and the tier never holds more than ``n_pages`` of memory.

    Invariants: every page index is either free or handed out, never both; a
    page's memory is resident in at most one home (``_home``); a free page sits
    in ``_resident[its home]`` if it has one, else in ``_bare``.
    """

    def __init__(self, n_pages: int, drop: Callable[[str, int], None] | None = None) -> None:
        self.n_pages = n_pages
        self.drop = drop or (lambda _home, _page: None)
        self._bare: deque[int] = deque(range(n_pages))
        self._resident: dict[str, deque[int]] = {}
        self._home: dict[int, str] = {}
        self._out: set[int] = set()
        self._free = n_pages

    def take(self, home: str = "") -> int | None:
        """A free page for ``home``: one already resident there, else a bare one,
        else one resident elsewhere (its memory there dropped first)."""
        own = self._resident.get(home)
        if own:
            page = own.popleft()
        elif self._bare:
            page = self._bare.popleft()
        else:
            other = max(self._resident, key=lambda h: len(self._resident[h]), default=None)
            if other is None or not self._resident[other]:
                return None
            page = self._resident[other].popleft()
            self.drop(other, page)
        self._home[page] = home
        self._out.add(page)
        self._free -= 1
        return page

    def give(self, page: int) -> None:
        if page not in self._out:
            raise ValueError(f"page {page} was not handed out")
        self._out.remove(page)
        self._resident.setdefault(self._home[page], deque()).append(page)
        self._free += 1

    def resident(self, home: str) -> int:
        """Free pages whose memory stays in ``home``'s region."""
        return len(self._resident.get(home) or ())

    @property
    def free(self) -> int:
        return self._free

    @property
    def kept(self) -> int:
        """Free pages whose memory stays with the scope that used them last."""
        return self._free - len(self._bare)

    @property
    def used(self) -> int:
        return len(self._out)

    def handed_out(self) -> set[int]:
        """The pages handed out now (a copy: for checks)."""
        return set(self._out)

    def check(self) -> None:
        """Raise ``InvariantError`` where an invariant above does not hold."""
        free = list(self._bare) + [p for q in self._resident.values() for p in q]
        if len(set(free)) != len(free) or set(free) & self._out:
            raise InvariantError("a page is free twice, or both free and handed out")
        if set(free) | self._out != set(range(self.n_pages)) or self._free != len(free):
            raise InvariantError("free and handed-out pages do not add up to the tier")
        for home, pages in self._resident.items():
            if any(self._home.get(p) != home for p in pages):
                raise InvariantError(f"a page resident in {home!r} has another home")
        if any(p in self._home for p in self._bare):
            raise InvariantError("a bare page still has a home")


@dataclass
class SlotPool:
    """Slots of one (scope, block size) in one tier.

    Invariant: for each page held, ``used[page] + len(free slots of page) ==
    slots_per_page``; ``partial`` is exactly the held pages with a free slot; a
    page with ``used == 0`` is returned at once.
    """

    pages: FreePages
    slots_per_page: int
    home: str = ""  # the region these slots live in (see ``FreePages``)
    free_slots: dict[int, list[int]] = field(default_factory=dict)
    used: dict[int, int] = field(default_factory=dict)
    partial: set[int] = field(default_factory=set)  # pages held that have a free slot

    def alloc(self) -> Slot | None:
        if self.partial:
            page = next(iter(self.partial))
            free = self.free_slots[page]
            self.used[page] += 1
            slot = Slot(page, free.pop())
            if not free:
                self.partial.discard(page)
            return slot
        taken = self.pages.take(self.home)
        if taken is None:
            return None
        page = taken
        self.free_slots[page] = list(range(self.slots_per_page - 1, -1, -1))
        self.used[page] = 1
        slot = Slot(page, self.free_slots[page].pop())
        if self.free_slots[page]:
            self.partial.add(page)
        return slot

    def free(self, slot: Slot) -> None:
        if slot.page not in self.used or slot.index in self.free_slots[slot.page]:
            raise ValueError(f"slot {slot} is not allocated")
        self.free_slots[slot.page].append(slot.index)
        self.partial.add(slot.page)
        self.used[slot.page] -= 1
        if self.used[slot.page] == 0:
            del self.used[slot.page], self.free_slots[slot.page]
            self.partial.discard(slot.page)
            self.pages.give(slot.page)

    @property
    def slots_used(self) -> int:
        return sum(self.used.values())

    def allocated(self) -> set[Slot]:
        """Every slot handed out and not freed (a scan: for checks, not hot paths)."""
        return {
            Slot(page, i)
            for page, free in self.free_slots.items()
            for i in set(range(self.slots_per_page)) - set(free)
        }

    def check(self) -> None:
        """Raise ``InvariantError`` where an invariant above does not hold."""
        if self.used.keys() != self.free_slots.keys():
            raise InvariantError("pages with counts and pages with free lists differ")
        for page, free in self.free_slots.items():
            if len(set(free)) != len(free) or not set(free) <= set(range(self.slots_per_page)):
                raise InvariantError(f"page {page} lists a free slot twice or out of range")
            if self.used[page] + len(free) != self.slots_per_page or self.used[page] <= 0:
                raise InvariantError(f"page {page}: {self.used[page]} used, {len(free)} free")
        if self.partial != {p for p, free in self.free_slots.items() if free}:
            raise InvariantError("the partial pages are not exactly those with a free slot")
