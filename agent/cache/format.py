"""How a ``kvmarina.Cache`` value is laid out in the agent's blocks.

A value under a key digest ``d`` (``tensor_cache.key_digest``: namespaced) is::

    head block     hash = H("head", d)            header, then the value's first bytes
    chunk i >= 1   hash = H("chunk", d, gen, i)   the next ``block_bytes`` bytes each

``gen`` is 8 random bytes drawn per put: chunks of two writes of one key never
share a hash, so a reader that found head generation ``g`` reads only chunks of
``g``, never a mix. The header names the format version, the key digest (checked
on read), ``gen``, dtype, shape, byte count and block count.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

MAGIC = b"KVTC"
VERSION = 1
# magic, version, header length, key digest, gen, nbytes, blocks, dtype name, ndim
_FIXED = struct.Struct("<4sHH16s8sQI16sH")
FIXED_BYTES = _FIXED.size  # enough to learn a head's generation and block count
MAX_DIMS = 64
ALIGN = 64  # data starts aligned: copies in and out run at full speed


class FormatError(ValueError):
    """A head block that is not a value of this format (or of another key)."""


def block_hash(kind: bytes, digest: bytes, size: int, *parts: bytes) -> bytes:
    """Blake2b of the key digest (namespaced already) and the block's role.
    ``person`` keeps these apart from the KV blocks' chained hashes."""
    h = hashlib.blake2b(kind, digest_size=size, person=b"kvmarina-tcache")
    h.update(digest)
    for p in parts:
        h.update(p)
    return h.digest()


def namespace_tag(namespace: str) -> bytes:
    """The tag a namespace's blocks carry (head: + b"h", chunks: + b"c")."""
    return hashlib.blake2b(
        namespace.encode("utf-8"), digest_size=15, person=b"kvm-tcache-ns"
    ).digest()


@dataclass(frozen=True, slots=True)
class Header:
    digest: bytes
    gen: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    n_blocks: int

    @property
    def data_offset(self) -> int:
        return data_offset(len(self.shape))

    def pack(self) -> bytes:
        name = str(self.dtype).removeprefix("torch.").encode("ascii")
        head = _FIXED.pack(
            MAGIC, VERSION, self.data_offset, self.digest, self.gen,
            self.nbytes, self.n_blocks, name, len(self.shape),
        )  # fmt: skip
        return head + struct.pack(f"<{len(self.shape)}Q", *self.shape)

    def chunk_hashes(self, size: int) -> list[bytes]:
        return [
            block_hash(b"chunk", self.digest, size, self.gen, i.to_bytes(4, "little"))
            for i in range(1, self.n_blocks)
        ]


def data_offset(ndim: int) -> int:
    return -(-(FIXED_BYTES + 8 * ndim) // ALIGN) * ALIGN


def blocks_needed(nbytes: int, ndim: int, block_bytes: int) -> int:
    """Head (header + first bytes) plus as many full-size chunks as the rest needs."""
    rest = max(0, nbytes - (block_bytes - data_offset(ndim)))
    return 1 + -(-rest // block_bytes)


def parse_fixed(raw: bytes) -> tuple[bytes, bytes, int, int]:
    """(digest, gen, nbytes, n_blocks) from a header's fixed part."""
    if len(raw) < FIXED_BYTES:
        raise FormatError("head block shorter than a header")
    magic, version, _, digest, gen, nbytes, n_blocks, _, _ = _FIXED.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise FormatError(f"not a tensor-cache head (magic {magic!r}, version {version})")
    return digest, gen, nbytes, n_blocks


def parse(raw: bytes, digest: bytes, block_bytes: int) -> Header:
    """The header in ``raw`` (a head block's first bytes), checked to be this key's
    and self-consistent: a mismatch raises instead of returning wrong bytes."""
    found, gen, nbytes, n_blocks = parse_fixed(raw)
    _, _, offset, _, _, _, _, name, ndim = _FIXED.unpack_from(raw)
    if found != digest:
        raise FormatError("head block belongs to another key")
    if ndim > MAX_DIMS or offset != data_offset(ndim) or len(raw) < FIXED_BYTES + 8 * ndim:
        raise FormatError("corrupt tensor-cache header")
    shape = struct.unpack_from(f"<{ndim}Q", raw, FIXED_BYTES)
    dtype = getattr(torch, name.rstrip(b"\0").decode("ascii", "replace"), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"unknown dtype {name!r} in a tensor-cache header")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != math.prod(shape) * itemsize or n_blocks != blocks_needed(
        nbytes, ndim, block_bytes
    ):
        raise FormatError("tensor-cache header sizes disagree")
    return Header(digest, gen, dtype, tuple(shape), nbytes, n_blocks)


def segments(
    offsets: list[int], data_off: int, nbytes: int, block_bytes: int
) -> list[tuple[int, int, int]]:
    """(region offset, value offset, length) runs covering the value's bytes, given
    its blocks' region offsets (head first); touching blocks merge into one run."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for i, off in enumerate(offsets):
        start = off + (data_off if i == 0 else 0)
        length = min(nbytes - pos, off + block_bytes - start)
        if length <= 0:
            break
        if out and out[-1][0] + out[-1][2] == start:
            r, v, n = out[-1]
            out[-1] = (r, v, n + length)
        else:
            out.append((start, pos, length))
        pos += length
    return out
