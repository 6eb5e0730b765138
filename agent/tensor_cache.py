"""``kvmarina.Cache``: a node-shared tensor cache with a size limit and an eviction policy.

    cache = Cache(capacity="10GiB", policy="lru", namespace="embeddings")
    cache["doc-1"] = tensor
    cache["doc-1"]            # the same dtype, shape and values
    embed = cache.memoize(model.embed)

Values are torch tensors of any dtype and shape; keys are ``str`` or ``bytes``.
Every operation validates first and changes state last, so a bad key, a
non-tensor or a tensor larger than the capacity raises without evicting or
losing anything already stored.

Storage lives behind a small ``Store`` interface: the agent's pool when an agent
runs on the node (shared by every process there), or this process's memory
otherwise (said once in the log) with the same semantics.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from kvmarina.quantity import QuantityError, parse_size

log = logging.getLogger(__name__)
POLICIES = ("lru", "lfu")
_MISSING = object()
F = TypeVar("F", bound=Callable[..., Any])


class CacheError(ValueError):
    """A misuse of the cache: the message names the argument and what to do."""


@dataclass(frozen=True, slots=True)
class Stats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    items: int
    capacity: int
    backend: str


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored value: raw bytes plus what it takes to rebuild the tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: torch.Tensor  # uint8, contiguous, owned by the store

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def tensor(self) -> torch.Tensor:
        """A fresh tensor (the caller may modify it; the stored bytes stay intact)."""
        return self.data.clone().view(self.dtype).reshape(self.shape)


def to_entry(value: torch.Tensor) -> Entry:
    flat = value.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).clone() if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return Entry(value.dtype, tuple(value.shape), data)


def key_digest(namespace: str, key: str | bytes) -> bytes:
    """The block identity of a key: namespaced so two namespaces never collide."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    ns = namespace.encode("utf-8")
    return hashlib.blake2b(
        len(ns).to_bytes(4, "little") + ns + raw, digest_size=16, person=b"kvmarina-tensor"
    ).digest()


class Store(Protocol):
    """Where entries live. ``put`` may evict others to make room but never the new one."""

    name: str

    def get(self, digest: bytes) -> Entry | None: ...

    def put(self, digest: bytes, entry: Entry) -> list[bytes]: ...

    def delete(self, digest: bytes) -> bool: ...

    def __contains__(self, digest: object) -> bool: ...

    def __len__(self) -> int: ...

    def used_bytes(self) -> int: ...


class LocalStore:
    """In-process store with byte capacity and LRU or LFU eviction.

    Invariants: ``used_bytes() <= capacity``; ``_order`` lists exactly the keys
    of ``_entries``, least valuable first (LRU: least recently used; LFU: fewest
    uses, ties broken by least recent use).
    """

    name = "in-process"

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity, self.policy = capacity, policy
        self._entries: dict[bytes, Entry] = {}
        self._order: OrderedDict[bytes, None] = OrderedDict()
        self._uses: dict[bytes, int] = {}
        self._used = 0

    def _touch(self, digest: bytes) -> None:
        self._uses[digest] = self._uses.get(digest, 0) + 1
        self._order.move_to_end(digest)

    def _victim(self) -> bytes:
        if self.policy == "lru":
            return next(iter(self._order))
        # LFU: scan in recency order, keep the first of the lowest count
        return min(self._order, key=lambda d: self._uses[d])

    def get(self, digest: bytes) -> Entry | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._touch(digest)
        return entry

    def put(self, digest: bytes, entry: Entry) -> list[bytes]:
        old = self._entries.get(digest)
        need = entry.nbytes - (old.nbytes if old else 0)
        evicted = []
        while self._used + need > self.capacity:
            victim = self._victim()
            if victim == digest:  # replacing itself: do not count as an eviction
                break
            self._drop(victim)
            evicted.append(victim)
        if old is not None:
            self._used -= old.nbytes
        self._entries[digest] = entry
        self._order.setdefault(digest, None)
        self._used += entry.nbytes
        self._touch(digest)
        return evicted

    def _drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest)
        self._order.pop(digest, None)
        self._uses.pop(digest, None)
        self._used -= entry.nbytes

    def delete(self, digest: bytes) -> bool:
        if digest not in self._entries:
            return False
        self._drop(digest)
        return True

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def used_bytes(self) -> int:
        return self._used


class Cache:
    """A tensor cache. See the module docstring for the contract."""

    _warned_local = False

    def __init__(
        self,
        capacity: str | int = "1GiB",
        policy: str = "lru",
        namespace: str = "default",
        agent: str | None = None,
    ) -> None:
        try:
            self.capacity = parse_size(capacity)
        except QuantityError as exc:
            raise CacheError(f"capacity: {exc}") from None
        if self.capacity <= 0:
            raise CacheError("capacity must be positive")
        if policy not in POLICIES:
            raise CacheError(
                f"policy {policy!r} is not supported; use one of {', '.join(POLICIES)}"
            )
        if not isinstance(namespace, str) or not namespace:
            raise CacheError("namespace must be a non-empty string")
        self.policy, self.namespace = policy, namespace
        self._store: Store = self._open_store(agent)
        self._hits = self._misses = self._evictions = 0

    def _open_store(self, agent: str | None) -> Store:
        if agent is not None:
            # The agent-backed store (values as blocks in the node pool) is not built yet:
            # say so instead of silently caching in this process.
            raise CacheError(
                "Cache(agent=...) is not available in this build yet; omit agent= to cache "
                "in this process"
            )
        if not Cache._warned_local:
            log.info("kvmarina.Cache: no agent given; values live in this process only")
            Cache._warned_local = True
        return LocalStore(self.capacity, self.policy)

    # ------------------------------------------------------------ validation

    def _digest(self, key: Any) -> bytes:
        if not isinstance(key, (str, bytes)):
            raise CacheError(f"keys must be str or bytes, got {type(key).__name__}")
        return key_digest(self.namespace, key)

    def _entry(self, value: Any) -> Entry:
        if not isinstance(value, torch.Tensor):
            raise CacheError(f"values must be torch tensors, got {type(value).__name__}")
        nbytes = value.numel() * value.element_size()
        if nbytes > self.capacity:
            raise CacheError(
                f"a tensor of {nbytes} bytes cannot fit a cache of "
                f"{self.capacity} bytes; raise capacity"
            )
        return to_entry(value)

    # ------------------------------------------------------------ mapping API

    def __setitem__(self, key: str | bytes, value: torch.Tensor) -> None:
        digest, entry = self._digest(key), self._entry(value)
        self._evictions += len(self._store.put(digest, entry))

    def __getitem__(self, key: str | bytes) -> torch.Tensor:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def get(self, key: str | bytes, default: Any = None) -> Any:
        entry = self._store.get(self._digest(key))
        if entry is None:
            self._misses += 1
            return default
        self._hits += 1
        return entry.tensor()

    def __contains__(self, key: object) -> bool:
        return self._digest(key) in self._store

    def __delitem__(self, key: str | bytes) -> None:
        if not self._store.delete(self._digest(key)):
            raise KeyError(key)

    def __len__(self) -> int:
        return len(self._store)

    def stats(self) -> Stats:
        return Stats(
            self._hits,
            self._misses,
            self._evictions,
            self._store.used_bytes(),
            len(self._store),
            self.capacity,
            self._store.name,
        )

    def memoize(self, fn: F | None = None, *, key: Callable[..., str | bytes] | None = None) -> Any:
        """Cache ``fn``'s tensor results by its arguments (``repr`` unless ``key`` is given)."""

        def wrap(func: F) -> F:
            @functools.wraps(func)
            def inner(*args: Hashable, **kwargs: Hashable) -> torch.Tensor:
                k = (
                    key(*args, **kwargs)
                    if key
                    else f"{func.__qualname__}:{args!r}:{sorted(kwargs.items())!r}"
                )
                hit = self.get(k, _MISSING)
                if hit is not _MISSING:
                    return hit  # type: ignore[no-any-return]
                value = func(*args, **kwargs)
                self[k] = value
                return value

            return inner  # type: ignore[return-value]

        return wrap(fn) if fn is not None else wrap
