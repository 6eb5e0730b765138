"""kvmarina.Cache semantics: every test runs against the in-process store and the
agent-backed store (a real agent process on a unix socket)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
import torch

from kvmarina.agent.cache.tensor_cache import Cache, CacheError

from .conftest import AgentProc, agent_process

BLOCK = 4096  # the agent store's chunk size here; values below take one block each

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


@pytest.fixture(scope="module")
def module_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    with agent_process(tmp_path_factory.mktemp("agent")) as agent:
        yield agent


@pytest.fixture
def shared_agent(module_agent: AgentProc) -> Iterator[str]:
    """One agent process for the module, emptied after each test: caches with one
    token share that serving's budget, so a test must not inherit another's values."""
    yield module_agent.socket
    req = urllib.request.Request(module_agent.url + "/admin/clear", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


@pytest.fixture(params=["in-process", "agent"])
def make_cache(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    made: list[Cache] = []

    def make(**kw: object) -> Cache:
        if request.param == "agent":
            sock = request.getfixturevalue("shared_agent")
            kw = {"namespace": request.node.name, **kw}
            kw.update(agent=sock, token="tok-chat", chunk_bytes=BLOCK)
        cache = Cache(**kw)  # type: ignore[arg-type]
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


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
    cache = make_cache(capacity=3 * BLOCK, policy="lru")
    for k in "abc":
        cache[k] = torch.full((3500,), ord(k), dtype=torch.uint8)
    cache["a"]  # a is now most recent
    cache["d"] = torch.zeros(3500, dtype=torch.uint8)
    assert [k for k in "abcd" if k in cache] == ["a", "c", "d"]
    assert cache.stats().evictions == 1 and len(cache) == 3
    assert torch.equal(cache["a"], torch.full((3500,), ord("a"), dtype=torch.uint8))


def test_lfu_evicts_least_frequently_used(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity=3 * BLOCK, policy="lfu")
    for k in "abc":
        cache[k] = torch.zeros(3500, dtype=torch.uint8)
    for _ in range(3):
        cache["a"]
        cache["c"]
    cache["b"]  # b is the most recent, but has 2 uses; a and c have 4
    cache["d"] = torch.zeros(3500, dtype=torch.uint8)
    assert [k for k in "abcd" if k in cache] == ["a", "c", "d"]
    assert cache.stats().evictions == 1


def test_bad_input_loses_nothing(make_cache) -> None:  # type: ignore[no-untyped-def]
    cache = make_cache(capacity=2 * BLOCK)
    cache["keep"] = torch.ones(1024, dtype=torch.uint8)
    with pytest.raises(CacheError, match="cannot fit a cache of 8192 bytes"):
        cache["big"] = torch.zeros(3 * BLOCK, dtype=torch.uint8)
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
    assert s.hits >= 1 and s.misses >= 2 and s.bytes >= 12 and s.items == 1


def test_namespaces_do_not_collide(make_cache) -> None:  # type: ignore[no-untyped-def]
    from kvmarina.agent.cache.tensor_cache import key_digest

    assert key_digest("a", "bc") != key_digest("ab", "c")
    assert key_digest("a", "x") != key_digest("b", "x")
