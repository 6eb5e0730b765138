"""A memo in front of ``HashContract.block_hashes`` for prompts that share prefixes,
and the lazily extended chain of one prompt's block hashes.

Hashing is the largest part of a routing decision (about 0.5 us per block with
blake2b, so ~250 us for an 8k-token prompt), and the prompts a router sees share
long prefixes (system prompts, multi-turn chats): exactly the blocks it would
hash again. The memo cuts a prompt into chunks of ``chunk_blocks`` blocks and
caches each chunk's hashes under the exact key ``(parent hash, chunk token
bytes)``. A hit is a dictionary lookup; a miss calls the library function with
``parent=``, so every hash still comes from the one contract function and a
memoized result is bit-identical to hashing the whole prompt at once.

A decision needs only the hashes up to the end of the longest prefix any index
holds (a block past it cannot change any run), so ``PromptHashes`` computes the
chain as far as it is asked; the rest is computed when the request has been sent
on (``PromptHashes.all``, for the router's record of where prefixes went).
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
        self.chunk_blocks = chunk_blocks
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

    def chain(self, tokens: Sequence[int], salt: str) -> PromptHashes:
        """The prompt's block hashes, none computed yet."""
        return PromptHashes(self, tokens, salt)

    def block_hashes(self, tokens: Sequence[int], salt: str) -> list[bytes]:
        return PromptHashes(self, tokens, salt).all()


class PromptHashes:
    """One prompt's chain of block hashes, computed as far as asked.

    Token ids are packed (and range-checked) chunk by chunk as they are hashed: an 8k
    prompt costs ~45 us to pack whole, more than the decision needs. (The server has
    checked every id against the vocabulary when it parsed the request.)

    Invariant: ``done`` equals the first ``len(done)`` hashes of
    ``contract.block_hashes(tokens, identity, salt)``; every memo chunk completed here
    was memoized under its exact key."""

    __slots__ = ("_memo", "_seed", "_tokens", "done", "hashed", "n_blocks")

    def __init__(self, memo: HashMemo, tokens: Sequence[int], salt: str) -> None:
        self._memo = memo
        self._tokens = tokens
        self._seed = memo.seed(salt)
        self.done: list[bytes] = []
        self.n_blocks = len(tokens) // memo.contract.block_size
        self.hashed = 0  # blocks of ``done`` hashed here (the rest came from the memo)

    def __len__(self) -> int:
        return self.n_blocks

    def all(self) -> list[bytes]:
        return self.upto(self.n_blocks)

    def _packed(self, start: int, stop: int) -> array[int]:
        """Tokens of blocks ``start..stop`` as uint32."""
        bs = self._memo.contract.block_size
        part = self._tokens[start * bs : stop * bs]
        if isinstance(part, array) and part.typecode == "I":
            return part
        return array("I", part)

    def upto(self, blocks: int) -> list[bytes]:
        """At least the first ``min(blocks, n_blocks)`` hashes (whole memo chunks when
        the memo has them); the list is ``done`` itself, do not modify it."""
        m = self._memo
        done, want = self.done, min(blocks, self.n_blocks)
        cb, memo = m.chunk_blocks, m._memo
        while len(done) < want:
            b = len(done)
            if b % cb == 0 and m.max_chunks:  # a chunk starts: the memo may have it
                key = (done[-1] if b else self._seed) + self._packed(
                    b, min(b + cb, self.n_blocks)
                ).tobytes()
                got = memo.get(key)
                if got is not None:
                    m.hits += 1
                    memo.move_to_end(key)
                    done += got
                    continue
            self._hash(b, want)
        return done

    def _hash(self, b: int, end: int) -> None:
        """Hash blocks ``b..end`` in one call of the contract, and memoize the chunks
        this completes."""
        m = self._memo
        done, bs, cb = self.done, m.contract.block_size, m.chunk_blocks
        first = b - b % cb if m.max_chunks else b  # the chunk holding block b (maybe begun)
        arr = self._packed(first, end)
        parent = done[-1] if b else self._seed
        done += m.contract.block_hashes(arr[(b - first) * bs :], "", parent=parent)
        self.hashed += end - b
        if not m.max_chunks:
            return
        memo, start = m._memo, first
        while start < end:
            stop = min(start + cb, self.n_blocks)
            if stop > end:
                break
            chunk = arr[(start - first) * bs : (stop - first) * bs].tobytes()
            memo[(done[start - 1] if start else self._seed) + chunk] = done[start:stop]
            m.misses += 1
            start = stop
        while len(memo) > m.max_chunks:
            memo.popitem(last=False)
