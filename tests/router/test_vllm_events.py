"""vLLM's KV events into the router's index: the mapping onto the pool's contract (pure),
and bad publishers on real ZMQ sockets (a pod whose events are garbage, of another
block size, never there, or silent). The real vLLM runs in ``tests/vllm``."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from kvmarina.hashing import HashContract
from kvmarina.router.index import DEVICE, HOST, BlockIndex
from kvmarina.router.vllm_events import EventFormatError, PodBlocks, decode_batch
from kvmarina.router.vllm_follower import VLLMFollower

from .conftest import Fleet, router_doc, wait_for

BS = 4
C = HashContract(BS)
IDENT = "m@main|L1/H1/D8/float32/B4|tp0of1"


def stored(hashes: list[Any], parent: Any, tokens: list[int], **kw: Any) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": kw.pop("block_size", BS),
        "lora_id": None,
        "medium": kw.pop("medium", "GPU"),
        "extra_keys": kw.pop("extra_keys", None),
        **kw,
    }


def batch(*events: Any, ts: float | None = None) -> bytes:
    return msgpack.packb([time.time() if ts is None else ts, list(events), 0])


def pod_blocks() -> tuple[PodBlocks, BlockIndex]:
    index = BlockIndex(1000)
    return PodBlocks("pod/a", index, C, IDENT), index


def test_stored_blocks_get_the_contract_hash_from_tokens_parents_and_salt() -> None:
    blocks, index = pod_blocks()
    tokens = list(range(12))
    ours = C.block_hashes(tokens, IDENT, "tenant-1")
    # vLLM stores the prompt in two events: 2 blocks, then 1 more under its parent
    _, evs = decode_batch(
        batch(stored([11, 12], None, tokens[:8], extra_keys=[["tenant-1"], None]))
    )
    blocks.apply(evs)
    _, evs = decode_batch(batch(stored([13], 12, tokens[8:])))
    blocks.apply(evs)
    assert index.node_blocks("pod/a") == dict.fromkeys(ours, DEVICE)
    # another salt is another tenant: other hashes
    _, evs = decode_batch(batch(stored([21], None, tokens[:4], extra_keys=[["tenant-2"]])))
    blocks.apply(evs)
    assert C.block_hashes(tokens[:4], IDENT, "tenant-2")[0] in index.node_blocks("pod/a")
    assert len(blocks) == 4


def test_removals_name_vllm_hashes_and_media_set_the_tier() -> None:
    blocks, index = pod_blocks()
    tokens = list(range(8))
    a, b = C.block_hashes(tokens, IDENT, "s")
    _, evs = decode_batch(batch(stored([1, 2], None, tokens, extra_keys=[["s"], None])))
    blocks.apply(evs)
    # offloaded to CPU as well, then dropped from the GPU: the host copy remains
    _, evs = decode_batch(batch(stored([2], 1, tokens[4:], medium="CPU")))
    blocks.apply(evs)
    _, evs = decode_batch(batch({"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"}))
    blocks.apply(evs)
    assert index.node_blocks("pod/a") == {a: DEVICE, b: HOST}
    _, evs = decode_batch(batch({"type": "BlockRemoved", "block_hashes": [1, 2], "medium": None}))
    blocks.apply(evs)  # medium None is not GPU: nothing tracked under it
    _, evs = decode_batch(
        batch(
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"},
            {"type": "BlockRemoved", "block_hashes": [2, 99], "medium": "CPU"},
        )
    )
    blocks.apply(evs)
    assert index.node_blocks("pod/a") == {} and len(blocks) == 0


def test_cleared_orphans_groups_and_the_array_form() -> None:
    blocks, index = pod_blocks()
    _, evs = decode_batch(batch(stored([5], 404, [1, 2, 3, 4])))  # parent never seen
    blocks.apply(evs)
    assert blocks.orphans == 1 and len(index) == 0
    # another KV-cache group (hybrid models) and remote storage are not node tiers
    _, evs = decode_batch(batch(stored([6], None, [1, 2, 3, 4], group_idx=1)))
    blocks.apply(evs)
    _, evs = decode_batch(batch(stored([7], None, [1, 2, 3, 4], medium="STORAGE")))
    blocks.apply(evs)
    assert len(index) == 0
    # vLLM before 0.11 published events as tagged arrays
    _, evs = decode_batch(batch(["BlockStored", [8], None, [1, 2, 3, 4], BS, None, "GPU"]))
    blocks.apply(evs)
    assert index.node_blocks("pod/a") == {C.block_hashes([1, 2, 3, 4], IDENT, "")[0]: DEVICE}
    _, evs = decode_batch(batch({"type": "AllBlocksCleared"}))
    blocks.apply(evs)
    assert index.node_blocks("pod/a") == {} and len(blocks) == 0


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xc1not msgpack", "garbage"),
        (msgpack.packb({"ts": 1}), "garbage"),
        (batch({"type": "Nope"}), "garbage"),
        (batch(stored([1], None, [1, 2])), "garbage"),
        (batch(stored(["x"], None, [1, 2, 3, 4])), "garbage"),
        (batch(stored([1], None, list(range(8)), block_size=8)), "block_size"),
    ],
    # a batch carries the time it was made: ids that hold none, for pytest-xdist, whose
    # workers must collect the same tests
    ids=["not-msgpack", "no-batch", "unknown-type", "short-hashes", "bad-hash", "block-size"],
)
def test_unreadable_batches_name_their_reason(payload: bytes, reason: str) -> None:
    blocks, _ = pod_blocks()
    with pytest.raises(EventFormatError) as err:
        blocks.apply(decode_batch(payload)[1])
    assert err.value.reason == reason


# -- bad publishers on real sockets ------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class Publisher:
    """A ZMQ PUB socket that sends what a test gives it, numbered like vLLM's."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.seq = 0

    async def send(self, payload: bytes, parts: int = 3) -> None:
        frames = [b"kv", self.seq.to_bytes(8, "big"), payload][:parts]
        await self.sock.send_multipart(frames)
        self.seq += 1

    async def send_until(self, payload: bytes, read: Callable[[], bool]) -> None:
        """Send ``payload`` again until ``read()`` says a follower took it: a PUB socket
        drops what it sends before a new subscriber's subscription has reached it
        (ZMQ's slow joiner), and a follower counts as connected before that."""
        deadline = asyncio.get_running_loop().time() + 10.0
        while not read():
            assert asyncio.get_running_loop().time() < deadline, "never read"
            await self.send(payload)
            for _ in range(20):
                await asyncio.sleep(0.01)
                if read():
                    return

    def close(self) -> None:
        self.sock.close(0)


def follower(url: str, **kw: Any) -> tuple[VLLMFollower, list[bool]]:
    blocks, _ = pod_blocks()
    changes: list[bool] = []
    f = VLLMFollower("a", url, None, blocks, lambda _d, live: changes.append(live), **kw)
    f.start()
    return f, changes


async def test_garbage_and_foreign_block_sizes_are_said_once_and_never_indexed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pub = Publisher()
    f, _ = follower(pub.url, suspect_s=0.5)
    try:
        await wait_for(lambda: f.live)
        await pub.send_until(
            batch(stored([1], None, [1, 2, 3, 4], extra_keys=[["s"]])), lambda: len(f.blocks) == 1
        )
        with caplog.at_level(logging.WARNING, "kvmarina.router.vllm"):
            for _ in range(3):
                await pub.send(b"\x00garbage")
            await pub.send(b"two parts", parts=2)
            await wait_for(lambda: f.errors["garbage"] == 4)
        assert not f.live and len(f.blocks) == 0 and f.blocks.index.node_blocks("pod/a") == {}
        assert sum("cannot" in r.message or "not msgpack" in r.message for r in caplog.records) == 1
        await pub.send(batch(stored([2], None, [1, 2, 3, 4])))
        await wait_for(lambda: f.live, timeout=3)  # readable again after suspect_s
        with caplog.at_level(logging.WARNING, "kvmarina.router.vllm"):
            await pub.send(batch(stored([3], None, list(range(8)), block_size=8)))
            await wait_for(lambda: f.errors["block_size"] == 1)
        assert not f.live
        assert any("--block-size 4" in r.message for r in caplog.records)
        assert f.health()["errors"] == {"garbage": 4, "block_size": 1}
    finally:
        await f.stop()
        pub.close()


async def test_a_pod_without_a_publisher_is_unreachable_and_never_live() -> None:
    f, changes = follower(f"tcp://127.0.0.1:{free_port()}", connect_grace_s=0.3)
    try:
        await wait_for(lambda: f.errors["unreachable"] == 1, timeout=3)
        assert not f.connected and not f.live and changes == []
    finally:
        await f.stop()


async def test_a_silent_pod_falls_back_until_it_publishes() -> None:
    pub = Publisher()
    f, _ = follower(pub.url, silent_s=0.3)
    try:
        await wait_for(lambda: f.live)
        f.expect()  # the router sent it new blocks
        await wait_for(lambda: f.errors["silent"] == 1, timeout=3)
        assert not f.live
        await pub.send(batch(stored([1], None, [1, 2, 3, 4])))
        await wait_for(lambda: f.live)
    finally:
        await f.stop()
        pub.close()


async def test_the_router_routes_a_bad_pod_from_its_own_record(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    """Two pods: one publishes garbage, one has no publisher. The router keeps serving,
    says so per pod on /metrics and /health, and falls back to its own record."""
    pub = Publisher()
    pods = []
    for i, events in enumerate((pub.url, f"tcp://127.0.0.1:{free_port()}")):
        _, url = await fleet.engine(node=f"n{i}")
        pods.append({"name": f"v{i}", "url": url, "node": f"n{i}", "kv_events": events})
    router, url = await fleet.router(router_doc(pods, engine="vllm"))
    for f in router.vllm.values():
        f.connect_grace_s, f.suspect_s = 0.3, 30.0
    try:
        await wait_for(lambda: router.vllm["v0"].live)
        garbage = router.vllm["v0"].errors
        await pub.send_until(b"garbage", lambda: garbage["garbage"] > 0)
        await wait_for(lambda: router.core.mode == "approximate", timeout=3)
        prompt = "a shared system prompt " * 20
        for _ in range(3):
            body = {"model": "sim", "prompt": prompt, "max_tokens": 2}
            async with http.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200
        # from its own record: the repeats went where the first one went
        served = sorted(p.served for p in router.core.pods.values())
        assert served == [0, 3]
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        read = float(garbage["garbage"])  # 1 unless a resent one was read as well
        assert f'kvmarina_router_engine_events_errors{{pod="v0",reason="garbage"}} {read}' in text
        await wait_for(lambda: router.vllm["v1"].errors["unreachable"] == 1, timeout=3)
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'kvmarina_router_engine_events_errors{pod="v1",reason="unreachable"} 1.0' in text
        assert 'kvmarina_router_engine_events_live{pod="v0"} 0.0' in text
        async with http.get(f"{url}/health") as r:
            health = await r.json()
        assert health["pods"]["v1"]["kv_events"]["connected"] is False
    finally:
        pub.close()
    await asyncio.sleep(0)
