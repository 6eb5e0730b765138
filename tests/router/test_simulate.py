"""The simulated engine: OpenAI API, KV reuse, and the agent event stream it publishes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp

from kvmarina.events import BlockEvent, LoadRecord, Snapshot, from_wire
from kvmarina.framing import FrameDecoder
from kvmarina.hashing import HashContract
from kvmarina.tokenizer import ByteTokenizer

from .conftest import IDENT, Fleet


async def read_records(
    resp: aiohttp.ClientResponse, n: int, loads: list[LoadRecord] | None = None
) -> list[object]:
    """The next ``n`` block records; the load records met on the way go to ``loads``."""
    dec, out = FrameDecoder(), []
    async for chunk in resp.content.iter_any():
        dec.feed(chunk)
        for rec in map(from_wire, dec.frames()):
            if isinstance(rec, LoadRecord):
                if loads is not None:
                    loads.append(rec)
            else:
                out.append(rec)
        if len(out) >= n:
            return out
    return out


async def test_completions_cached_tokens_and_events(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    eng, url = await fleet.engine(node="node-x", kv_blocks=8)
    prompt = "x" * 100  # 6 full blocks
    async with http.get(f"{url}/v1/events") as ev:
        (snap,) = await read_records(ev, 1)
        assert isinstance(snap, Snapshot) and snap.node == "node-x" and snap.blocks == {}
        hdrs = {"x-kvmarina-salt": "t1"}
        body = {"model": "sim", "prompt": prompt, "max_tokens": 4}
        async with http.post(f"{url}/v1/completions", json=body, headers=hdrs) as r:
            doc = await r.json()
        assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert doc["choices"][0]["text"] and doc["usage"]["completion_tokens"] == 4
        (stored,) = await read_records(ev, 1)
        expect = HashContract().block_hashes(ByteTokenizer().encode(prompt), IDENT, "t1")
        assert isinstance(stored, BlockEvent) and stored.type == "stored"
        assert list(stored.hashes) == expect and stored.seq == snap.seq + 1
        async with http.post(f"{url}/v1/completions", json=body, headers=hdrs) as r:
            doc = await r.json()
        assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
        # another tenant's salt shares nothing
        async with http.post(
            f"{url}/v1/completions", json=body, headers={"x-kvmarina-salt": "t2"}
        ) as r:
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        recs = await read_records(ev, 2)  # t2's 6 blocks stored, 4 of t1's evicted (cap 8)
        assert [(r.type, len(r.hashes)) for r in recs] == [("stored", 6), ("evicted", 4)]
        assert [r.seq for r in recs] == [snap.seq + 2, snap.seq + 3]
    # a new subscriber's snapshot holds exactly the cache
    async with http.get(f"{url}/v1/events") as ev:
        (snap2,) = await read_records(ev, 1)
        assert set(snap2.blocks) == set(eng.kv.blocks) and snap2.seq == eng.hub.seq


async def test_the_engine_pushes_its_load_on_the_event_stream(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    """Once a loop turn while it changes: router replicas learn at once what the others
    sent (no pod name: the simulated pod is its node's only engine)."""
    _, url = await fleet.engine(prefill_tps=500.0)  # 100 tokens: 0.2 s of prefill
    body = {"model": "sim", "prompt": "y" * 100, "max_tokens": 2}
    async with http.get(f"{url}/v1/events") as ev:
        await read_records(ev, 1)  # the snapshot
        sent = asyncio.create_task(http.post(f"{url}/v1/completions", json=body))
        loads: list[LoadRecord] = []
        while not loads:
            await read_records(ev, 0, loads)
        assert loads[0] == LoadRecord("", running=1, waiting=0, queued_tokens=100)
        (await sent).release()
        while loads[-1].running:
            await read_records(ev, 0, loads)
        assert loads[-1] == LoadRecord("", running=0, waiting=0, queued_tokens=0)


async def test_a_prompt_is_announced_as_its_prefill_starts(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    """As vLLM's scheduler caches a chunk's blocks when it schedules it: a router
    replica that did not send the prompt learns where it is being computed before
    its first token."""
    eng, url = await fleet.engine(prefill_tps=200.0)  # 96 tokens: ~0.5 s of prefill
    body = {"model": "sim", "prompt": "z" * 96, "max_tokens": 1}
    async with http.get(f"{url}/v1/events") as ev:
        await read_records(ev, 1)  # the snapshot
        sent = asyncio.create_task(http.post(f"{url}/v1/completions", json=body))
        (stored,) = await read_records(ev, 1)
        assert isinstance(stored, BlockEvent) and stored.type == "stored"
        assert len(stored.hashes) == 6 and not sent.done()  # still prefilling
        assert eng.load().queued_tokens > 0
        async with await sent as r:
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chat_streaming_and_errors(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    _, url = await fleet.engine()
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
    }
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [ln[6:] for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    text = "".join(d["choices"][0]["delta"].get("content", "") for d in docs if d["choices"])
    assert len(text) == 3 and docs[-1]["usage"]["completion_tokens"] == 3
    async with http.post(f"{url}/v1/completions", data=b"{nope") as r:
        assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
    async with http.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"}) as r:
        assert r.status == 404


async def test_pull_hint_counts_pulled_tokens(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    eng, url = await fleet.engine()
    hdrs = {"x-kvmarina-pull": "node=n9;agent=http://127.0.0.1:1;blocks=4"}
    async with http.post(
        f"{url}/v1/completions", json={"model": "sim", "prompt": "y" * 80}, headers=hdrs
    ) as r:
        assert r.status == 200
    assert eng.stats.pulled_tokens == 64


def test_cli_simulate_replicas() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmarina.cli",
            "engine",
            "--simulate",
            "--port",
            "0",
            "--replicas",
            "2",
            "--node",
            "sim",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["nodes"] == ["sim-0", "sim-1"] and len(info["simulated_engines"]) == 2
    finally:
        proc.kill()
        proc.wait()
