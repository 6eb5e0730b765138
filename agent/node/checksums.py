"""Per-block checksums: the pool's ``migration.checksum``, xxh3 (64-bit) or CRC32C.

Every agent of a pool uses the same algorithm (one ConfigMap); a run's header
names the sender's, so agents that disagree fail loudly instead of calling
every block corrupt. Both release the GIL on large buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import crc32c
import xxhash

ALGORITHMS = ("xxh3", "crc32c")
Buffer = bytes | bytearray | memoryview


class Digest(Protocol):
    def update(self, data: Buffer) -> None: ...

    def intdigest(self) -> int: ...


class _Crc32c:
    """Streaming CRC32C with xxhash's ``update``/``intdigest`` shape."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Buffer) -> None:
        self.value = crc32c.crc32c(data, self.value)

    def intdigest(self) -> int:
        return self.value


def check(name: str) -> str:
    if name not in ALGORITHMS:
        raise ValueError(f"checksum {name!r}: use one of {', '.join(ALGORITHMS)}")
    return name


def one_shot(name: str) -> Callable[[Buffer], int]:
    """The checksum of one buffer."""
    if check(name) == "crc32c":
        return lambda data: int(crc32c.crc32c(data))
    return xxhash.xxh3_64_intdigest


def streaming(name: str) -> Digest:
    """A digest fed a chunk at a time (a block as it arrives)."""
    return _Crc32c() if check(name) == "crc32c" else xxhash.xxh3_64()
