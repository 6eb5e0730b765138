"""A memo in front of ``HashContract.block_hashes`` for prompts that share prefixes.

Hashing is the largest part of a routing decision (about 0.5 us per block with
blake2b, so ~250 us for an 8k-token prompt), and the prompts a router sees share
long prefixes (system prompts, multi-turn chats): exactly the blocks it would
hash again. The memo cuts a prompt into chunks of ``chunk_blocks`` blocks and
caches each chunk's hashes under the exact key ``(parent hash, chunk token
bytes)``. A hit is a dictionary lookup; a miss calls the library function with
``parent=``, so every hash still comes from the one contract function and a
memoized result is bit-identical to hashing the whole prompt at once.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

from kvmarina.hashing import HashContract


class HashMemo:
    """Invariants: ``len(_memo) <= max_chunks``; ``_memo[parent + bytes]`` equals
    ``contract.block_hashes(chunk, parent=parent)`` for the contract it was built for
    (a new contract or identity needs a new memo)."""

    def __init__(
        self,
        contract: HashContract,
        model_identity: str,
        max_chunks: int = 16384,
        chunk_blocks: int = 32,
    ) -> None:
        self.contract = contract
        self.model_identity = model_identity
        self.max_chunks = max_chunks
        self.chunk_tokens = chunk_blocks * contract.block_size
        self._memo: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self._seeds: dict[str, bytes] = {}
        self.hits = 0
        self.misses = 0

    def seed(self, salt: str) -> bytes:
        """The chain's seed for ``salt`` (memoized: a router sees few salts)."""
        seed = self._seeds.get(salt)
        if seed is None:
            if len(self._seeds) > 4096:
                self._seeds.clear()
            seed = self._seeds[salt] = self.contract.seed(self.model_identity, salt)
        return seed

    def block_hashes(self, tokens: Sequence[int], salt: str) -> list[bytes]:
        arr: array[int] = (
            tokens if isinstance(tokens, array) and tokens.typecode == "I" else array("I", tokens)
        )
        if self.max_chunks == 0:
            return self.contract.block_hashes(arr, self.model_identity, salt)
        parent = self.seed(salt)
        bs = self.contract.block_size
        full = (len(arr) // bs) * bs
        step = self.chunk_tokens
        memo = self._memo
        out: list[bytes] = []
        start = 0
        while start < full:  # memoized chunks, as long as they hit
            key = parent + arr[start : min(start + step, full)].tobytes()
            got = memo.get(key)
            if got is None:
                break
            self.hits += 1
            memo.move_to_end(key)
            out += got
            parent = got[-1]
            start += step
        if start >= full:
            return out
        # the first miss: hash the whole rest in one call, then memoize it chunk by chunk
        rest = self.contract.block_hashes(arr[start:full], "", parent=parent)
        per_chunk = step // bs
        for k, pos in enumerate(range(start, full, step)):
            got = rest[k * per_chunk : (k + 1) * per_chunk]
            memo[parent + arr[pos : min(pos + step, full)].tobytes()] = got
            parent = got[-1]
            self.misses += 1
        while len(memo) > self.max_chunks:
            memo.popitem(last=False)
        out += rest
        return out
