from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmarina.hashing import HashContract, HashingError, pack_tokens

IDENT = "llama-tiny@main|L4/H2/D64/float32/B16|tp0of1"

# Golden vectors: these bytes are the contract. If this test fails, every
# cached block in every running fleet would silently change identity.
GOLDEN = {
    ("blake2b", 16): "96692eb2daad4514a6a126858f98e4b7",
    ("sha256", 32): "e8f3c00aacee785edc8481622e0a2220d4b9c39a6140c40bf7967dd211ad9491",
}


def test_golden_vectors() -> None:
    for (algo, size), expected in GOLDEN.items():
        c = HashContract(4, algo, size)
        hashes = c.block_hashes(list(range(10)), "model@rev", "tenant-a")
        assert len(hashes) == 2
        assert hashes[-1].hex() == expected, (algo, hashes[-1].hex())


def test_only_full_blocks_are_hashed() -> None:
    c = HashContract(16)
    assert len(c.block_hashes(list(range(15)), IDENT)) == 0
    assert len(c.block_hashes(list(range(16)), IDENT)) == 1
    assert len(c.block_hashes(list(range(47)), IDENT)) == 2
    assert all(len(h) == 16 for h in c.block_hashes(list(range(64)), IDENT))


def test_salt_and_identity_isolate() -> None:
    c = HashContract(16)
    toks = list(range(64))
    base = c.block_hashes(toks, IDENT, "tenant-a")
    assert not set(base) & set(c.block_hashes(toks, IDENT, "tenant-b"))
    assert not set(base) & set(c.block_hashes(toks, IDENT + "x", "tenant-a"))
    # length-prefixing: moving a byte between identity and salt changes everything
    assert c.seed("ab", "c") != c.seed("a", "bc")
    # a different contract never aliases
    assert not set(base) & set(
        HashContract(16, "blake2b", 32).block_hashes(toks, IDENT, "tenant-a")
    )


def test_parent_continues_the_chain() -> None:
    c = HashContract(8)
    toks = list(range(100, 180))
    whole = c.block_hashes(toks, IDENT, "s")
    first = c.block_hashes(toks[:32], IDENT, "s")
    rest = c.block_hashes(toks[32:], IDENT, "s", parent=first[-1])
    assert first + rest == whole


@settings(max_examples=60, deadline=None)
@given(
    toks=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=200),
    cut=st.integers(0, 200),
    block=st.sampled_from([1, 2, 4, 16]),
)
def test_prefix_property(toks: list[int], cut: int, block: int) -> None:
    """Blocks of a prefix are exactly the leading blocks of the whole."""
    c = HashContract(block)
    whole = c.block_hashes(toks, IDENT, "salt")
    prefix = c.block_hashes(toks[:cut], IDENT, "salt")
    assert whole[: len(prefix)] == prefix
    assert len(whole) == len(toks) // block


@settings(max_examples=40, deadline=None)
@given(
    a=st.lists(st.integers(0, 300), min_size=16, max_size=48),
    b=st.lists(st.integers(0, 300), min_size=16, max_size=48),
)
def test_different_blocks_differ(a: list[int], b: list[int]) -> None:
    c = HashContract(16)
    ha, hb = c.block_hashes(a, IDENT), c.block_hashes(b, IDENT)
    for i in range(min(len(ha), len(hb))):
        assert (ha[i] == hb[i]) == (a[: 16 * (i + 1)] == b[: 16 * (i + 1)])


def test_identical_across_processes() -> None:
    """Same hashes in fresh interpreters with different hash seeds."""
    code = (
        "from kvmarina.hashing import HashContract;"
        "print(HashContract(16).block_hashes(list(range(1000)), 'm', 'salt')[-1].hex())"
    )
    outs = set()
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        outs.add(res.stdout.strip())
    outs.add(HashContract(16).block_hashes(list(range(1000)), "m", "salt")[-1].hex())
    assert len(outs) == 1


def test_bad_tokens_and_contracts() -> None:
    c = HashContract(16)
    with pytest.raises(HashingError, match=r"outside 0\.\.4294967295"):
        c.block_hashes([1, 2, -3], IDENT)
    with pytest.raises(HashingError, match="outside"):
        pack_tokens([2**32])
    with pytest.raises(HashingError, match="integers"):
        pack_tokens(["a"])  # type: ignore[list-item]
    with pytest.raises(HashingError, match="allowed: blake2b, sha256"):
        HashContract(16, "xxh3")
    with pytest.raises(HashingError, match="allowed digest bits: 256"):
        HashContract(16, "sha256", 16)
    with pytest.raises(HashingError, match="positive"):
        HashContract(0)


def test_pack_is_little_endian_uint32() -> None:
    assert pack_tokens([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_matches_the_documented_construction() -> None:
    """Recompute the chain from the module docstring with plain hashlib."""
    import hashlib
    import struct

    def lp(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    seed = hashlib.blake2b(
        b"kvmarina/block/v1" + lp(b"blake2b-128/4") + lp(b"model@rev") + lp(b"tenant-a"),
        digest_size=16,
    ).digest()
    prev = seed
    toks = list(range(8))
    for i in range(2):
        data = b"".join(struct.pack("<I", t) for t in toks[4 * i : 4 * i + 4])
        prev = hashlib.blake2b(prev + data, digest_size=16).digest()
    assert HashContract(4).block_hashes(toks, "model@rev", "tenant-a")[-1] == prev
