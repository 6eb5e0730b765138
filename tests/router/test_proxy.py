"""The router for real: in front of simulated engines on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvmarina.engine.simulate import SimConfig, SimEngine
from kvmarina.router.config import parse_config

from .conftest import IDENT, Fleet, router_doc, serve_app, wait_for


def dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


async def engines(fleet: Fleet, n: int, agents: bool = True, **kw: Any) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        _, url = await fleet.engine(node=f"n{i}", **kw)
        out.append(
            {"name": f"p{i}", "url": url, "node": f"n{i}", **({"agent_url": url} if agents else {})}
        )
    return out


async def complete(
    http: aiohttp.ClientSession, url: str, prompt: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    headers = kw.pop("headers", None)
    body = {"model": "sim", "prompt": prompt, "max_tokens": 2, **kw}
    async with http.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        return r.status, await r.json()


def cached(doc: dict[str, Any]) -> int:
    return int(doc["usage"]["prompt_tokens_details"]["cached_tokens"])


async def test_routes_to_the_cached_pod_in_events_mode(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    pods = await engines(fleet, 4)
    router, url = await fleet.router(router_doc(pods))
    await wait_for(lambda: router.core.mode == "events")
    prompts = [f"system prompt {k} " * 40 for k in range(6)]
    for p in prompts:
        assert (await complete(http, url, p))[0] == 200
    await wait_for(lambda: len(router.core.index) >= 6 * (len(prompts[0]) // 16))
    for p in prompts:
        status, doc = await complete(http, url, p + " and a new question")
        assert status == 200 and cached(doc) >= len(p) // 16 * 16
    async with http.get(f"{url}/health") as r:
        h = await r.json()
    assert h["mode"] == "events" and h["status"] == "ok"
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    assert 'kvmarina_router_index_mode{mode="events"} 1.0' in text
    assert "kvmarina_router_index_max_blocks" in text
    async with http.get(f"{url}/v1/models") as r:
        assert (await r.json())["data"][0]["id"] == "sim"


async def test_streaming_passthrough_and_salt(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = await engines(fleet, 1)
    doc = router_doc(pods, sharing={"scope": "cluster", "tenant_header": "x-tenant"})
    _, url = await fleet.router(doc)
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "q" * 64}],
        "stream": True,
        "max_tokens": 5,
        "stream_options": {"include_usage": True},
    }
    async with http.post(f"{url}/v1/chat/completions", json=body, headers={"x-tenant": "a"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        chunks = [c async for c in r.content.iter_any()]
    lines = [ln for ln in b"".join(chunks).decode().splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 7
    # the same prompt from tenant a hits, from tenant b (or with a forged salt) it does not
    prompt = "shared prefix " * 20
    await complete(http, url, prompt, headers={"x-tenant": "a"})
    assert cached((await complete(http, url, prompt, headers={"x-tenant": "a"}))[1]) > 0
    forged = {"x-tenant": "b", "x-kvmarina-salt": ""}
    assert cached((await complete(http, url, prompt, headers=forged))[1]) == 0


async def test_bad_input_never_reaches_a_pod(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = await engines(fleet, 1)
    doc = router_doc(pods, limits={"max_body_bytes": 1000})
    _, url = await fleet.router(doc)
    eng = fleet.engines[0]
    cases = [
        (b"{not json", 400, "JSON"),
        (json.dumps({"model": "sim"}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x"}).encode(), 400, "model"),
        (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "gpt-9"),
        (json.dumps({"model": "sim", "prompt": "x" * 2000}).encode(), 413, "limit"),
        (json.dumps({"model": "sim", "prompt": {"a": 1}}).encode(), 400, "prompt"),
        (json.dumps({"model": "sim", "prompt": "x", "max_tokens": -1}).encode(), 400, "max"),
    ]
    for raw, status, needle in cases:
        async with http.post(
            f"{url}/v1/completions", data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == status, raw
            assert needle in (await r.json())["error"]["message"]
    async with http.post(f"{url}/v1/chat/completions", json={"model": "sim", "messages": []}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "messages"
    assert eng.stats.requests == 0 and eng.stats.rejected == 0


async def test_no_healthy_pod_is_503(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = [{"name": f"d{i}", "url": dead_url(), "node": f"n{i}"} for i in range(2)]
    router, url = await fleet.router(router_doc(pods))
    await wait_for(lambda: not any(p.healthy for p in router.core.pods.values()))
    status, doc = await complete(http, url, "hello")
    assert status == 503 and "no pod is healthy" in doc["error"]["message"]
    async with http.get(f"{url}/health") as r:
        assert r.status == 503 and (await r.json())["status"] == "unavailable"


async def test_retry_on_next_pod_and_breaker(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = await engines(fleet, 1, agents=False)
    pods.insert(0, {"name": "dead", "url": dead_url(), "node": "nd"})
    doc = router_doc(
        pods,
        routing={"policy": "round-robin"},
        limits={"health_interval_s": 60, "breaker_failures": 2, "breaker_cooldown_s": 60},
    )
    router, url = await fleet.router(doc)
    await asyncio.sleep(0.1)
    router.core.pods["dead"].healthy = True  # pretend the health check has not noticed yet
    for _ in range(4):
        status, _doc = await complete(http, url, "x" * 40)
        assert status == 200
    dead = router.core.pods["dead"]
    assert dead.failed == 2 and dead.breaker.state == "open"
    assert router.metrics.retries.value == 2


async def test_queue_full_is_429_with_retry_after(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    pods = await engines(fleet, 1, prefill_tps=200.0)  # 400 tokens take 2 s
    doc = router_doc(pods, limits={"max_inflight": 1, "max_queue": 0, "retry_after_s": 3})
    _, url = await fleet.router(doc)
    slow = asyncio.create_task(complete(http, url, "z" * 400))
    await asyncio.sleep(0.3)
    async with http.post(f"{url}/v1/completions", json={"model": "sim", "prompt": "q"}) as r:
        assert r.status == 429 and r.headers["Retry-After"] == "3"
        assert (await r.json())["error"]["type"] == "rate_limit_error"
    slow.cancel()


async def test_two_replicas_converge(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = await engines(fleet, 3, kv_blocks=40)
    a, url_a = await fleet.router(router_doc(pods))
    for k in range(12):  # fills, then evicts: stored and evicted events
        await complete(http, url_a, f"doc {k} " * 30)
    b, _ = await fleet.router(router_doc(pods))  # starts late: snapshot, then live
    for k in range(12, 20):
        await complete(http, url_a, f"doc {k} " * 30)

    def same() -> bool:
        return all(
            a.core.index.node_blocks(n)
            == b.core.index.node_blocks(n)
            == dict.fromkeys(e.kv.blocks, "device")
            for n, e in zip(("n0", "n1", "n2"), fleet.engines, strict=True)
        )

    await wait_for(lambda: a.core.mode == b.core.mode == "events" and same())
    assert sum(f.events for f in a.followers.values()) > 0


async def test_approximate_mode_without_events(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = await engines(fleet, 3, agents=False)
    router, url = await fleet.router(router_doc(pods))
    for k in range(5):
        await complete(http, url, f"conversation {k} " * 30)
    for k in range(5):
        _, doc = await complete(http, url, f"conversation {k} " * 30 + "more")
        assert cached(doc) > 0
    async with http.get(f"{url}/health") as r:
        assert (await r.json())["mode"] == "approximate"
    assert router.core.mode == "approximate"


async def test_event_stream_gap_resyncs(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    pods = await engines(fleet, 1)
    router, url = await fleet.router(router_doc(pods))
    await wait_for(lambda: router.core.mode == "events")
    eng = fleet.engines[0]
    eng.hub.seq += 5  # the agent skips numbers: subscribers must see a gap and resync
    await complete(http, url, "gap " * 20)
    f = router.followers["n0"]
    await wait_for(lambda: f.resyncs >= 1 and f.live and f.seq == eng.hub.seq)
    await wait_for(
        lambda: router.core.index.node_blocks("n0") == dict.fromkeys(eng.kv.blocks, "device")
    )


async def test_config_reload_without_dropping_requests(
    fleet: Fleet, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    pods = await engines(fleet, 2)
    path = tmp_path / "router.json"
    path.write_text(json.dumps(router_doc(pods[:1])))
    router, url = await fleet.router(parse_config(json.loads(path.read_text())), path)
    inflight = [asyncio.create_task(complete(http, url, f"r{k} " * 20)) for k in range(20)]
    path.write_text(json.dumps(router_doc(pods, routing={"policy": "round-robin"})))
    await wait_for(lambda: len(router.core.pods) == 2)
    assert all(s == 200 for s, _ in await asyncio.gather(*inflight))
    for k in range(4):
        assert (await complete(http, url, f"after {k}"))[0] == 200
    assert all(p.served > 0 for p in router.core.pods.values())
    path.write_text("{broken")  # a bad file keeps the last good config
    await asyncio.sleep(0.3)
    assert len(router.core.pods) == 2 and (await complete(http, url, "still"))[0] == 200


async def test_header_values_outside_latin_1_pass_through_unchanged(fleet: Fleet) -> None:
    """HTTP header values are bytes; a client's UTF-8 reaches the engine byte for byte
    (it was a 500 with a traceback when the router re-encoded it as Latin-1)."""
    seen: list[bytes] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if "x-note" in request.headers:  # aiohttp reads header bytes as UTF-8, escaped
            seen.append(request.headers["x-note"].encode("utf-8", "surrogateescape"))
        return await handler(request)

    app = SimEngine(SimConfig(model_identity=IDENT, prefill_tps=0, decode_tps=0)).app()
    app.middlewares.append(record)
    runner, eng_url = await serve_app(app)
    fleet.runners.append(runner)
    pods = [{"name": "p0", "url": eng_url, "node": "n0"}]
    _, router = await fleet.router(router_doc(pods, sharing={"tenant_header": "x-note"}))
    host, port = router.removeprefix("http://").split(":")
    body = json.dumps({"model": "sim", "prompt": "hello", "max_tokens": 2}).encode()
    for note in ("café ☕ 東京".encode(), b"caf\xe9 (Latin-1)"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Note: " + note + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body
        )  # fmt: skip
        await writer.drain()
        head = await reader.readline()
        writer.close()
        assert b" 200 " in head, head
        assert seen[-1] == note
