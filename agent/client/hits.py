"""A lookup's answer: where each block of the cached run lives (``Hit``), as columns (``Hits``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import NamedTuple, overload


class Hit(NamedTuple):
    """Where one cached block lives (a tuple: thousands are built per long lookup)."""

    hash: bytes
    page: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the slot index
    tier: str


# A lookup reply's tier of each hit, one byte each (the socket protocol's contract)
TIER_CODES = {"device": ord("d"), "host": ord("h")}
TIER_NAMES = {code: name for name, code in TIER_CODES.items()}


class Hits(Sequence[Hit]):
    """A lookup's cached run, column by column: hit ``i`` is ``hashes[i]`` at slot
    (``pages[i]``, ``indices[i]``) of tier ``tier(i)``.

    Columns, not ``Hit`` objects: a long lookup names thousands of blocks and its
    callers want the hashes (to release) and the slots (a block table), which the
    reply carries as packed arrays already. Indexing and iterating build ``Hit``s
    on demand. Invariant: every column has ``len(self)`` entries; ``tiers`` is
    ``None`` when every hit is in device memory (what a lookup leaves: it promotes
    host hits), else one code per hit (``d`` or ``h``).
    """

    __slots__ = ("hashes", "indices", "pages", "tiers")

    def __init__(
        self,
        hashes: list[bytes],
        pages: Sequence[int],
        indices: Sequence[int],
        tiers: bytes | None = None,
    ) -> None:
        if not len(hashes) == len(pages) == len(indices) or (
            tiers is not None and len(tiers) != len(hashes)
        ):
            raise ValueError("a lookup's columns differ in length")
        self.hashes, self.pages, self.indices, self.tiers = hashes, pages, indices, tiers

    def tier(self, i: int) -> str:
        return "device" if self.tiers is None else TIER_NAMES[self.tiers[i]]

    def slots(self) -> Iterator[tuple[int, int]]:
        """(page, index) of each hit, in order."""
        return zip(self.pages, self.indices, strict=True)

    def __len__(self) -> int:
        return len(self.hashes)

    @overload
    def __getitem__(self, i: int) -> Hit: ...
    @overload
    def __getitem__(self, i: slice) -> Hits: ...
    def __getitem__(self, i: int | slice) -> Hit | Hits:
        if isinstance(i, slice):
            tiers = None if self.tiers is None else self.tiers[i]
            return Hits(self.hashes[i], self.pages[i], self.indices[i], tiers)
        return Hit(self.hashes[i], self.pages[i], self.indices[i], self.tier(i))

    def __iter__(self) -> Iterator[Hit]:
        names = repeat("device") if self.tiers is None else map(TIER_NAMES.get, self.tiers)
        # tuple.__new__ straight from C: a third faster than Hit(...) per hit
        return map(
            tuple.__new__,
            repeat(Hit),
            zip(self.hashes, self.pages, self.indices, names, strict=False),  # names: endless
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Hits | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable columns, as a list

    def __repr__(self) -> str:
        return f"Hits({list(self)!r})"


NO_HITS = Hits([], (), ())
