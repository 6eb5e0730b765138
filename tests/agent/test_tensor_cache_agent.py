"""kvmarina.Cache on a real agent process: sharing across processes, overwrites
never seen half-done, partly evicted values are misses, clear refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvmarina.agent.cache import format as fmt
from kvmarina.agent.cache.tensor_cache import Cache, CacheError, key_digest
from kvmarina.agent.client import AgentClient

from .conftest import AgentProc, agent_process

BLOCK = 4096


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    with agent_process(tmp_path) as a:
        yield a


def cache(agent: AgentProc, **kw: object) -> Cache:
    args: dict[str, object] = {"capacity": 64 * BLOCK, "namespace": "t", "chunk_bytes": BLOCK}
    args.update(kw)
    return Cache(agent=agent.socket, token="tok-chat", **args)  # type: ignore[arg-type]


def run_py(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


CHILD = textwrap.dedent("""
    import sys, torch
    from kvmarina.agent.cache.tensor_cache import Cache
    c = Cache(capacity=64 * 4096, namespace="t", agent=sys.argv[1], token=sys.argv[2],
              chunk_bytes=4096)
    g = torch.Generator().manual_seed(7)
    want = torch.randn(50, 40, generator=g).to(torch.bfloat16).t()
""")


def test_a_value_put_by_one_process_is_read_by_another(agent: AgentProc) -> None:
    # the child puts (other serving, same namespace scope: team-a), this process reads
    put = run_py(CHILD + "c['shared'] = want\nprint('PUT')", agent.socket, "tok-code")
    assert put.returncode == 0 and "PUT" in put.stdout, put.stderr
    mine = cache(agent)
    g = torch.Generator().manual_seed(7)
    want = torch.randn(50, 40, generator=g).to(torch.bfloat16).t()
    got = mine["shared"]
    assert got.dtype == torch.bfloat16 and got.shape == (40, 50) and torch.equal(got, want)
    # and the other way round: this process puts, a fresh process reads the bytes
    mine["back"] = want * 2
    code = CHILD + "got = c['back']\nassert torch.equal(got, want * 2), 'bytes differ'\nprint('OK')"
    read = run_py(code, agent.socket, "tok-chat")
    assert read.returncode == 0 and "OK" in read.stdout, read.stderr
    # another namespace scope (team-b) sees nothing of team-a's values
    other = run_py(CHILD + "print('shared' in c, len(c))", agent.socket, "tok-other")
    assert other.stdout.split() == ["False", "0"], other.stderr
    mine.close()


def test_readers_in_another_process_never_see_a_half_overwritten_value(agent: AgentProc) -> None:
    writer = cache(agent)
    values = [torch.full((6000,), float(i), dtype=torch.float32) for i in range(2)]  # 6 blocks
    writer["k"] = values[0]
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD
            + textwrap.dedent("""
            seen = set()
            for _ in range(300):
                v = c.get('k')
                if v is None:
                    continue
                assert v.shape == (6000,) and v.dtype == torch.float32
                first = float(v[0])
                assert bool((v == first).all()), 'mixed generations'
                seen.add(first)
            print(sorted(seen))
            """),
            agent.socket,
            "tok-chat",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    i = 0
    while reader.poll() is None:
        i += 1
        writer["k"] = values[i % 2]
    out, err = reader.communicate()
    assert reader.returncode == 0, err
    assert out.strip() in ("[0.0]", "[1.0]", "[0.0, 1.0]")
    assert torch.equal(writer["k"], values[i % 2])
    assert agent.stats()["usage"] == {"team-a/chat": 6}  # old generations all dropped
    writer.close()


def test_a_value_missing_a_chunk_is_a_miss_and_is_cleared(agent: AgentProc) -> None:
    c = cache(agent)
    c["part"] = torch.arange(3000, dtype=torch.int64)  # 24000 bytes: 6 blocks
    c["whole"] = torch.ones(10)
    raw = AgentClient(agent.socket, "tok-chat", BLOCK).connect()
    size = int(raw.info["digest_bytes"])
    digest = key_digest("t", "part")
    n, head = raw.probe([fmt.block_hash(b"head", digest, size)], peek=fmt.FIXED_BYTES)
    assert n == 1 and head is not None
    _, gen, nbytes, n_blocks = fmt.parse_fixed(head)
    chunks = fmt.Header(digest, gen, torch.uint8, (nbytes,), nbytes, n_blocks).chunk_hashes(size)
    removed, _, _ = raw.drop([chunks[2]])  # as if the agent had evicted one chunk
    assert removed == [chunks[2]]
    assert "part" not in c and c.get("part") is None  # never partial data
    assert len(c) == 1 and raw.probe(chunks)[0] == 0  # the reader cleared the rest
    assert torch.equal(c["whole"], torch.ones(10))
    raw.close()
    c.close()


@pytest.mark.parametrize("node_policy", ["lru", "lfu"])
def test_own_eviction_follows_the_cache_policy_whatever_the_node_policy(
    tmp_path: Path, node_policy: str
) -> None:
    with agent_process(tmp_path, eviction=node_policy) as agent:
        lru = cache(agent, capacity=4 * BLOCK, policy="lru", namespace="lru")
        for k in "abc":
            lru[k] = torch.zeros(3000, dtype=torch.uint8)
        lru["a"]
        lru["b"]
        lru["a"]  # a: most uses and most recent; c: least recent
        lru["d"] = torch.zeros(3000, dtype=torch.uint8)
        lru["e"] = torch.zeros(3000, dtype=torch.uint8)
        assert [k for k in "abcde" if k in lru] == ["a", "b", "d", "e"]  # c went
        lru["f"] = torch.zeros(3000, dtype=torch.uint8)
        assert [k for k in "abcdef" if k in lru] == ["a", "d", "e", "f"]  # then b
        lru.close()
        # another serving (its own budget): least frequently used goes, though most recent
        lfu = Cache(capacity=3 * BLOCK, policy="lfu", namespace="lfu", agent=agent.socket,
                    token="tok-code", chunk_bytes=BLOCK)  # fmt: skip
        for k in "abc":
            lfu[k] = torch.zeros(3000, dtype=torch.uint8)
        lfu["c"]
        lfu["c"]
        lfu["a"]
        lfu["b"] = torch.ones(3000, dtype=torch.uint8)  # an overwrite starts a new count
        lfu["d"] = torch.zeros(3000, dtype=torch.uint8)
        assert [k for k in "abcd" if k in lfu] == ["a", "c", "d"]
        lfu.close()


def test_bad_input_and_bad_setup_say_what_to_do_and_lose_nothing(agent: AgentProc) -> None:
    c = cache(agent, capacity=2 * BLOCK)
    c["keep"] = torch.ones(100)
    # fits the byte capacity, but not with its header in two blocks
    with pytest.raises(CacheError, match=r"takes 3 blocks of 4096 bytes.*raise capacity"):
        c["edge"] = torch.zeros(2 * BLOCK, dtype=torch.uint8)
    with pytest.raises(CacheError, match="torch tensors"):
        c["x"] = b"bytes"  # type: ignore[assignment]
    with pytest.raises(CacheError, match="str or bytes"):
        c[1.5] = torch.ones(1)  # type: ignore[index]
    assert torch.equal(c["keep"], torch.ones(100)) and len(c) == 1
    with pytest.raises(CacheError, match="unknown credential"):
        Cache(agent=agent.socket, token="tok-forged")
    with pytest.raises(CacheError, match=r"no agent socket.*omit agent="):
        Cache(agent=str(Path(agent.socket).parent / "none.sock"), token="tok-chat")
    with pytest.raises(CacheError, match="KVMARINA_AGENT_TOKEN"):
        Cache(agent=agent.socket)
    with pytest.raises(CacheError, match="below one block"):
        Cache(capacity=1000, agent=agent.socket, token="tok-chat", chunk_bytes=BLOCK)
    with pytest.raises(CacheError, match="capacity"):
        Cache(capacity="lots", agent=agent.socket, token="tok-chat")
    assert torch.equal(c["keep"], torch.ones(100)) and len(c) == 1
    c.close()


def test_default_chunk_follows_small_agent_pages(agent: AgentProc) -> None:
    c = Cache(capacity="1MiB", agent=agent.socket, token="tok-chat")  # pages: 16 KiB here
    c["x"] = torch.arange(10_000)  # 80,000 bytes over several 16 KiB blocks
    assert torch.equal(c["x"], torch.arange(10_000))
    assert c.stats().bytes == 5 * 16384  # header + 80,000 bytes in 16 KiB blocks
    c.close()


def test_a_got_value_maps_the_shared_pages_privately(agent: AgentProc) -> None:
    """A get maps the value's pages (no copy); writing the tensor copies only what it
    touches; holding it never blocks an overwrite; its pins go when it is freed;
    closing the cache gives held tensors private copies of their bytes."""
    c = cache(agent)
    first = torch.arange(6000, dtype=torch.float32)  # 24000 bytes: 6 blocks of 4096
    c["k"] = first
    held = c["k"]
    assert torch.equal(held, first)
    held[:10] = -1  # copy-on-write: the cached value is untouched
    assert torch.equal(c["k"], first)
    c["k"] = first * 2  # an overwrite while `held` maps the old generation
    assert torch.equal(c["k"], first * 2) and float(held[100]) == 100.0
    del held  # its chunks are released and the old generation dropped by the next call
    assert torch.equal(c["k"], first * 2)
    assert agent.stats()["usage"] == {"team-a/chat": 6}
    kept = c["k"]
    c.close()  # the session's pins are gone: what `kept` maps must be its own now
    other = cache(agent)
    for i in range(12):  # churn the freed slots with other bytes
        other[f"x{i}"] = torch.full((6000,), -7.0)
    assert torch.equal(kept, first * 2)
    other.close()


def test_the_node_agent_is_found_from_the_environment_or_the_cache_stays_local(
    agent: AgentProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMARINA_AGENT_TOKEN", "tok-chat")
    monkeypatch.setenv("KVMARINA_AGENT_SOCKET", agent.socket)
    found = Cache(capacity=64 * BLOCK, namespace="t", chunk_bytes=BLOCK)
    assert found.stats().backend == "agent"
    found.close()
    monkeypatch.setenv("KVMARINA_AGENT_SOCKET", str(tmp_path / "no-agent.sock"))
    local = Cache(capacity=64 * BLOCK, namespace="t")
    local["k"] = torch.ones(3)
    assert local.stats().backend == "in-process" and torch.equal(local["k"], torch.ones(3))
