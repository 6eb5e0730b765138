"""What the pool hands its callers: sessions, their budgets, block locations, refusals."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from kvmarina.agent.node.credentials import Identity
from kvmarina.agent.node.index import Key, Slot


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
    pod: str = ""  # the engine's pod name, when it said (its load reports name it)

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
