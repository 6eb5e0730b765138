"""The block-hashing contract: one function, the same bytes in every process.

A block is ``block_size`` consecutive token ids. Its identity is a chained
cryptographic hash::

    seed     = H(DOMAIN | algorithm | len(identity) | identity | len(salt) | salt)
    hash[0]  = H(seed      | tokens[0:B]   as little-endian uint32)
    hash[i]  = H(hash[i-1] | tokens[iB:(i+1)B] as little-endian uint32)

so ``hash[i]`` names the whole prefix ``tokens[0:(i+1)B]`` under one model
identity and one tenant salt. Only full blocks are hashed; a trailing partial
block has no identity and is never shared.

Why these choices:

* ``H`` is cryptographic (blake2b, 128-bit digest by default). A collision would
  hand one tenant another tenant's KV, so non-cryptographic hashes (xxh3, CRC,
  Python's ``hash()``) are never used for identity.
* Token ids are packed as fixed-width little-endian uint32 so the bytes do not
  depend on the machine, the Python version or ``PYTHONHASHSEED``.
* The seed is length-prefixed so that ``("ab", "c")`` and ``("a", "bc")`` as
  (identity, salt) can never produce the same seed.
* The algorithm name is part of the seed, so a change of algorithm or digest
  length changes every hash rather than silently aliasing.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DOMAIN = b"kvmarina/block/v1"

#: algorithm name -> allowed digest sizes in bytes
ALGORITHMS: dict[str, tuple[int, ...]] = {
    "blake2b": (16, 32),
    "sha256": (32,),
}
DEFAULT_ALGORITHM = "blake2b"
DEFAULT_DIGEST_BYTES = 16
DEFAULT_BLOCK_SIZE = 16
MAX_TOKEN_ID = 2**32 - 1

_LITTLE_ENDIAN = sys.byteorder == "little"
_BLAKE2B_TEMPLATES = {size: hashlib.blake2b(digest_size=size) for size in ALGORITHMS["blake2b"]}


class HashingError(ValueError):
    """Input the hashing contract cannot accept (bad token ids, bad contract)."""


@dataclass(frozen=True, slots=True)
class HashContract:
    """How blocks are named for one ``KVCachePool``.

    Invariants: ``block_size >= 1``; ``algorithm`` is a key of ``ALGORITHMS``;
    ``digest_bytes`` is one of the sizes allowed for that algorithm.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    algorithm: str = DEFAULT_ALGORITHM
    digest_bytes: int = DEFAULT_DIGEST_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise HashingError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.algorithm not in ALGORITHMS:
            allowed = ", ".join(sorted(ALGORITHMS))
            raise HashingError(f"unknown hash algorithm {self.algorithm!r}; allowed: {allowed}")
        sizes = ALGORITHMS[self.algorithm]
        if self.digest_bytes not in sizes:
            allowed = ", ".join(str(s * 8) for s in sizes)
            raise HashingError(
                f"{self.algorithm} cannot give a {self.digest_bytes * 8}-bit digest; "
                f"allowed digest bits: {allowed}"
            )

    @property
    def digest_bits(self) -> int:
        return self.digest_bytes * 8

    def describe(self) -> str:
        """A short, stable name of the contract, e.g. ``blake2b-128/16``."""
        return f"{self.algorithm}-{self.digest_bits}/{self.block_size}"

    def _hasher(self, data: bytes | memoryview) -> Any:
        if self.algorithm == "blake2b":
            return hashlib.blake2b(data, digest_size=self.digest_bytes)
        return hashlib.sha256(data)

    def seed(self, model_identity: str, salt: str | bytes = b"") -> bytes:
        """The chain's starting value for one model identity and tenant salt."""
        ident = model_identity.encode("utf-8")
        salt_b = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
        algo = self.describe().encode("ascii")
        h = self._hasher(DOMAIN)
        h.update(struct.pack("<I", len(algo)) + algo)
        h.update(struct.pack("<I", len(ident)) + ident)
        h.update(struct.pack("<I", len(salt_b)) + salt_b)
        digest: bytes = h.digest()
        return digest

    def block_hashes(
        self,
        token_ids: Sequence[int] | array[int],
        model_identity: str,
        salt: str | bytes = b"",
        *,
        parent: bytes | None = None,
    ) -> list[bytes]:
        """Hashes of every full block of ``token_ids``.

        ``parent`` continues a chain: pass the last hash of an earlier call and
        the tokens that follow it (block-aligned) to extend a prefix without
        rehashing it; ``model_identity`` and ``salt`` are then ignored.
        """
        packed = pack_tokens(token_ids)
        step = 4 * self.block_size
        end = (len(packed) // step) * step
        prev = parent if parent is not None else self.seed(model_identity, salt)
        out: list[bytes] = []
        append = out.append
        # Copying a pre-built hasher is ~25% cheaper per block than calling the
        # constructor (no keyword parsing); the bytes hashed are the same.
        if self.algorithm == "blake2b":
            copy = _BLAKE2B_TEMPLATES[self.digest_bytes].copy
            for start in range(0, end, step):
                h = copy()
                h.update(prev + packed[start : start + step])
                prev = h.digest()
                append(prev)
        else:
            sha = hashlib.sha256
            for start in range(0, end, step):
                prev = sha(prev + packed[start : start + step]).digest()
                append(prev)
        return out

    def full_blocks(self, n_tokens: int) -> int:
        """How many full (shareable) blocks ``n_tokens`` tokens make."""
        return n_tokens // self.block_size


def pack_tokens(token_ids: Sequence[int] | array[int] | Iterable[int]) -> bytes:
    """Token ids as little-endian uint32 bytes; a clear error for ids out of range."""
    if (
        isinstance(token_ids, array)
        and token_ids.typecode in ("I", "L")
        and token_ids.itemsize == 4
    ):
        arr = token_ids
    else:
        try:
            arr = array("I", token_ids)
        except OverflowError as exc:
            bad = next(
                (t for t in token_ids if not 0 <= int(t) <= MAX_TOKEN_ID),  # type: ignore[union-attr]
                None,
            )
            raise HashingError(
                f"token id {bad!r} is outside 0..{MAX_TOKEN_ID}; token ids must be unsigned 32-bit"
            ) from exc
        except TypeError as exc:
            raise HashingError(f"token ids must be integers: {exc}") from exc
    if not _LITTLE_ENDIAN:
        arr = array("I", arr)
        arr.byteswap()
    return arr.tobytes()


def hex_hashes(hashes: Iterable[bytes]) -> list[str]:
    return [h.hex() for h in hashes]
