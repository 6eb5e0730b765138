"""Pages and the block slots cut from them.

A tier has ``n_pages`` pages. A page in use belongs to exactly one
(scope, block size) pair and is cut into ``page_size // block_bytes`` slots;
when its last slot is freed the page returns to the tier's free queue (and its
memory is released), so the same page index can next serve another scope.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmarina.agent.index import Slot


class FreePages:
    """Invariant: every page index is either in ``_free`` or handed out, never both."""

    def __init__(self, n_pages: int) -> None:
        self.n_pages = n_pages
        self._free: deque[int] = deque(range(n_pages))
        self._out: set[int] = set()

    def take(self) -> int | None:
        if not self._free:
            return None
        page = self._free.popleft()
        self._out.add(page)
        return page

    def give(self, page: int) -> None:
        if page not in self._out:
            raise ValueError(f"page {page} was not handed out")
        self._out.remove(page)
        self._free.append(page)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return len(self._out)


@dataclass
class SlotPool:
    """Slots of one (scope, block size) in one tier.

    Invariant: for each page held, ``used[page] + len(free slots of page) ==
    slots_per_page``; ``partial`` is exactly the held pages with a free slot; a
    page with ``used == 0`` is returned at once.
    """

    pages: FreePages
    slots_per_page: int
    on_page_freed: Callable[[int], None]
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
        taken = self.pages.take()
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
            self.on_page_freed(slot.page)

    @property
    def slots_used(self) -> int:
        return sum(self.used.values())
