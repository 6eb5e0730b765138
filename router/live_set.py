"""``LiveSet``: the domains whose event streams are live, counting its changes."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any, Self


class LiveSet(set[str]):
    """A set of domains that counts its changes, so ``RoutingCore.mode`` (a subset test
    over every node) is computed once per change, not once per request."""

    __slots__ = ("version",)

    def __init__(self, items: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.version = 0

    def add(self, item: str) -> None:
        self.version += 1
        super().add(item)

    def discard(self, item: object) -> None:
        self.version += 1
        super().discard(item)

    def remove(self, item: str) -> None:
        self.version += 1
        super().remove(item)

    def pop(self) -> str:
        self.version += 1
        return super().pop()

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def update(self, *others: Iterable[str]) -> None:
        self.version += 1
        super().update(*others)

    def difference_update(self, *others: Iterable[Any]) -> None:
        self.version += 1
        super().difference_update(*others)

    def intersection_update(self, *others: Iterable[Any]) -> None:
        self.version += 1
        super().intersection_update(*others)

    def symmetric_difference_update(self, other: Iterable[str]) -> None:
        self.version += 1
        super().symmetric_difference_update(other)

    def __ior__(self, other: AbstractSet[str]) -> Self:  # type: ignore[override,misc]
        self.version += 1
        return super().__ior__(other)

    def __iand__(self, other: AbstractSet[object]) -> Self:
        self.version += 1
        return super().__iand__(other)

    def __isub__(self, other: AbstractSet[object]) -> Self:
        self.version += 1
        return super().__isub__(other)

    def __ixor__(self, other: AbstractSet[str]) -> Self:  # type: ignore[override,misc]
        self.version += 1
        return super().__ixor__(other)
