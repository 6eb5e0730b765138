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

import contextlib
import functools
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from kvmarina.quantity import QuantityError, parse_size

log = logging.getLogger(__name__)
POLICIES = ("lru", "lfu")
AGENT_SOCKET_ENV = "KVMARINA_AGENT_SOCKET"
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
    """Where values live. ``put`` validates first (a refused value changes nothing),
    may evict others to make room but never the new one, and returns how many values
    it evicted when it knows (else ``evictions()`` says). ``get`` returns a fresh
    tensor the caller owns, or ``None``."""

    name: str

    def get(self, digest: bytes) -> torch.Tensor | None: ...

    def put(self, digest: bytes, value: torch.Tensor) -> int: ...

    def delete(self, digest: bytes) -> bool: ...

    def contains(self, digest: bytes) -> bool: ...

    def __len__(self) -> int: ...

    def used_bytes(self) -> int: ...

    def evictions(self) -> int | None: ...

    def close(self) -> None: ...


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

    def get(self, digest: bytes) -> torch.Tensor | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        self._touch(digest)
        return entry.tensor()

    def put(self, digest: bytes, value: torch.Tensor) -> int:
        entry = to_entry(value)
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
        return len(evicted)

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

    def contains(self, digest: bytes) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def used_bytes(self) -> int:
        return self._used

    def evictions(self) -> int | None:
        return None  # put() reports each eviction

    def close(self) -> None:
        self._entries.clear()
        self._order.clear()
        self._uses.clear()
        self._used = 0


class Cache:
    """A tensor cache. See the module docstring for the contract.

    ``agent``: the node agent's unix socket (values then live in its pool, shared
    with every process of the same sharing scope); default ``$KVMARINA_AGENT_SOCKET``
    when that socket exists, else this process's memory; ``token``: the serving credential
    to register with (default: ``$KVMARINA_AGENT_TOKEN``, else the file named by
    ``$KVMARINA_CREDENTIAL_FILE``); ``chunk_bytes``: the block size values are cut
    into in the pool (default 64 KiB, or the agent's page size if smaller).
    """

    _warned_local = False

    def __init__(
        self,
        capacity: str | int = "1GiB",
        policy: str = "lru",
        namespace: str = "default",
        agent: str | None = None,
        *,
        token: str | None = None,
        chunk_bytes: int | None = None,
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
        self._store: Store = self._open_store(agent, token, chunk_bytes)
        self._hits = self._misses = self._evictions = 0

    def _open_store(self, agent: str | None, token: str | None, chunk_bytes: int | None) -> Store:
        why = "no agent given"
        if agent is None and (found := os.environ.get(AGENT_SOCKET_ENV)):
            # the node's agent, as engines find it; none running there: in-process
            if os.path.exists(found):
                agent = found
            else:
                why = f"no agent running at ${AGENT_SOCKET_ENV} ({found})"
        if agent is not None:
            from kvmarina.agent.cache.store import open_store

            with _store_errors():
                return open_store(self, agent, token, chunk_bytes)
        if not Cache._warned_local:
            log.info("kvmarina.Cache: %s; values live in this process only", why)
            Cache._warned_local = True
        return LocalStore(self.capacity, self.policy)

    # ------------------------------------------------------------ validation

    def _digest(self, key: Any) -> bytes:
        if not isinstance(key, (str, bytes)):
            raise CacheError(f"keys must be str or bytes, got {type(key).__name__}")
        return key_digest(self.namespace, key)

    def _check(self, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise CacheError(f"values must be torch tensors, got {type(value).__name__}")
        nbytes = value.numel() * value.element_size()
        if nbytes > self.capacity:
            raise CacheError(
                f"a tensor of {nbytes} bytes cannot fit a cache of "
                f"{self.capacity} bytes; raise capacity"
            )
        return value

    # ------------------------------------------------------------ mapping API

    def __setitem__(self, key: str | bytes, value: torch.Tensor) -> None:
        digest, value = self._digest(key), self._check(value)
        with _store_errors():
            self._evictions += self._store.put(digest, value)

    def __getitem__(self, key: str | bytes) -> torch.Tensor:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def get(self, key: str | bytes, default: Any = None) -> Any:
        digest = self._digest(key)
        with _store_errors():
            value = self._store.get(digest)
        if value is None:
            self._misses += 1
            return default
        self._hits += 1
        return value

    def __contains__(self, key: object) -> bool:
        digest = self._digest(key)
        with _store_errors():
            return self._store.contains(digest)

    def __delitem__(self, key: str | bytes) -> None:
        digest = self._digest(key)
        with _store_errors():
            found = self._store.delete(digest)
        if not found:
            raise KeyError(key)

    def __len__(self) -> int:
        with _store_errors():
            return len(self._store)

    def stats(self) -> Stats:
        """hits/misses: this object's; evictions, bytes and items: the store's (for the
        agent store: node-wide for this namespace, bytes as blocks held)."""
        with _store_errors():
            evicted = self._store.evictions()
            return Stats(
                self._hits,
                self._misses,
                self._evictions if evicted is None else evicted,
                self._store.used_bytes(),
                len(self._store),
                self.capacity,
                self._store.name,
            )

    def close(self) -> None:
        """Let go of the store (the agent's session; stored values stay in its pool)."""
        self._store.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """The store's refusals and a lost agent, as ``CacheError`` with their message."""
    from kvmarina.agent.cache.store import StoreError
    from kvmarina.agent.client.connection import AgentError

    try:
        yield
    except (AgentError, StoreError) as exc:
        raise CacheError(str(exc)) from exc
