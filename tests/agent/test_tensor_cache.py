"""kvmarina.Cache semantics (the in-process store; the agent store runs the same tests)."""

from __future__ import annotations

import pytest
import torch

from kvmarina.agent.tensor_cache import Cache, CacheError

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.float64,
    torch.complex64,
]


@pytest.fixture
def make_cache():  # type: ignore[no-untyped-def]
    def make(**kw: object) -> Cache:
        return Cache(**kw)  # type: ignore[arg-type]

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_and_shape_round_trip_exactly(make_cache, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity="1MiB")
    value = (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
    cache["k"] = value
    got = cache["k"]
    assert got.dtype == dtype and got.shape == value.shape and torch.equal(got, value)


def test_non_contiguous_scalar_and_empty(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity="1MiB")
    base = torch.randn(6, 8, dtype=torch.bfloat16)
    cache["t"] = base.t()  # non-contiguous
    cache[b"scalar"] = torch.tensor(3.5)
    cache["empty"] = torch.empty(0, 5)
    assert torch.equal(cache["t"], base.t())
    assert cache[b"scalar"].shape == () and cache[b"scalar"].item() == 3.5
    assert cache["empty"].shape == (0, 5)
    got = cache["t"]
    got.zero_()  # the caller's copy: the stored value is unchanged
    assert torch.equal(cache["t"], base.t())


def test_lru_evicts_least_recently_used(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity=3 * 1024, policy="lru")
    for k in "abc":
        cache[k] = torch.zeros(1024, dtype=torch.uint8)
    cache["a"]  # a is now most recent
    cache["d"] = torch.zeros(1024, dtype=torch.uint8)
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.stats().evictions == 1


def test_lfu_evicts_least_frequently_used(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity=3 * 1024, policy="lfu")
    for k in "abc":
        cache[k] = torch.zeros(1024, dtype=torch.uint8)
    for _ in range(3):
        cache["a"]
        cache["c"]
    cache["b"]
    cache["d"] = torch.zeros(1024, dtype=torch.uint8)  # b has 2 uses, a and c 4
    assert "b" not in cache and "a" in cache and "c" in cache and "d" in cache


def test_bad_input_loses_nothing(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity=2048)
    cache["keep"] = torch.ones(1024, dtype=torch.uint8)
    with pytest.raises(CacheError, match="cannot fit a cache of 2048 bytes"):
        cache["big"] = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(CacheError, match="torch tensors"):
        cache["x"] = [1, 2, 3]  # type: ignore[assignment]
    with pytest.raises(CacheError, match="str or bytes"):
        cache[5] = torch.ones(1)  # type: ignore[index]
    assert torch.equal(cache["keep"], torch.ones(1024, dtype=torch.uint8)) and len(cache) == 1
    for kwargs, match in [
        ({"capacity": "ten gigs"}, "capacity"),
        ({"policy": "fifo"}, "policy"),
        ({"capacity": 0}, "positive"),
    ]:
        with pytest.raises(CacheError, match=match):
            make_cache(**kwargs)


def test_mapping_api_stats_and_memoize(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity="1MiB", namespace="emb")
    assert cache.get("nope", "dflt") == "dflt"
    cache["a"] = torch.ones(4)
    assert "a" in cache and len(cache) == 1
    del cache["a"]
    with pytest.raises(KeyError):
        cache["a"]
    with pytest.raises(KeyError):
        del cache["a"]
    calls = []

    @cache.memoize
    def embed(text: str) -> torch.Tensor:
        calls.append(text)
        return torch.full((3,), float(len(text)))

    assert torch.equal(embed("abc"), embed("abc")) and calls == ["abc"]
    s = cache.stats()
    assert s.hits >= 1 and s.misses >= 2 and s.bytes == 12 and s.items == 1


def test_namespaces_do_not_collide(make_cache) -> None:  # type: ignore[no-untyped-def]
    from kvmarina.agent.tensor_cache import key_digest

    assert key_digest("a", "bc") != key_digest("ab", "c")
    assert key_digest("a", "x") != key_digest("b", "x")


def test_agent_backed_store_is_refused_clearly() -> None:
    with pytest.raises(CacheError, match="not available in this build yet"):
        Cache(agent="/var/run/kvmarina/agent.sock")
