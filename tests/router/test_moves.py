"""A request taken back from a pod that another router had just given a long prompt:
the engine's early head says what is ahead of it, and the router sends it to the next
pod before the engine starts it (``RoutingCore.worth_moving``)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from kvmarina.load_report import AHEAD_HEADER
from kvmarina.router.server import Router

from .conftest import Fleet, router_doc, serve_app, wait_for

TPS = 4000.0  # the engines' prefill rate, and the router's figure for it


async def first_token_s(http: aiohttp.ClientSession, url: str, prompt: str) -> float:
    """A streamed completion read to its end; the seconds to its first chunk."""
    body = {"model": "sim", "prompt": prompt, "max_tokens": 2, "stream": True}
    loop = asyncio.get_running_loop()
    t0, first = loop.time(), 0.0
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for _ in r.content.iter_any():
            first = first or loop.time() - t0
    return first


async def two_pods(fleet: Fleet) -> tuple[Router, str, list[str]]:
    """Two engines on two nodes and a router over both (no event streams: the router
    hears nothing of what other routers send)."""
    urls = []
    for i in range(2):
        _, url = await fleet.engine(node=f"n{i}", prefill_tps=TPS)
        urls.append(url)
    pods = [{"name": f"p{i}", "url": u, "node": f"n{i}"} for i, u in enumerate(urls)]
    doc = router_doc(pods, routing={"prefill_tokens_per_second": TPS})
    router, url = await fleet.router(doc)
    return router, url, urls


async def test_a_request_with_another_routers_long_prompt_ahead_moves_to_the_next_pod(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    router, url, engines = await two_pods(fleet)
    e0, e1 = fleet.engines
    # "another replica" sends a 0.5 s prompt to p0, which this router's first cold
    # decision also picks (equal pods: the rotation starts at the first)
    other = asyncio.create_task(first_token_s(http, engines[0], "y" * 2000))
    await wait_for(lambda: e0.prefilling)
    ttft = await first_token_s(http, url, "x" * 400)
    await other
    assert router.metrics.moves.value == 1
    assert (e0.stats.requests, e1.stats.requests) == (1, 1), "p1 answered the moved request"
    assert e0.stats.prompt_tokens == 2000, "p0 never prefilled the request it gave back"
    assert ttft < 0.4, f"the moved request waited for the other prompt ({ttft:.3f} s)"
    assert e0.waiting == 0 and e0.queued_tokens == 0


async def test_a_request_with_little_ahead_stays(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    router, url, engines = await two_pods(fleet)
    e0, e1 = fleet.engines
    other = asyncio.create_task(first_token_s(http, engines[0], "y" * 64))  # 16 ms
    await wait_for(lambda: e0.prefilling, timeout=1.0, every=0.0)
    await first_token_s(http, url, "x" * 400)
    await other
    assert router.metrics.moves.value == 0
    assert (e0.stats.requests, e1.stats.requests) == (2, 0)


async def test_the_head_says_what_is_ahead_and_a_closed_request_leaves_the_queue(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    eng, url = await fleet.engine(node="n0", prefill_tps=TPS)
    body = {"model": "sim", "max_tokens": 2, "stream": True}
    first = await http.post(f"{url}/v1/completions", json={**body, "prompt": "a" * 2000})
    assert first.headers[AHEAD_HEADER] == "0"
    second = await http.post(f"{url}/v1/completions", json={**body, "prompt": "b" * 400})
    assert 1500 <= int(second.headers[AHEAD_HEADER]) <= 2000  # the first, partly done
    assert eng.waiting == 1 and eng.queued_tokens == 2400
    second.close()  # the client goes away while its request waits
    await wait_for(lambda: eng.waiting == 0 and eng.queued_tokens == 2000, timeout=0.4)
    await first.read()
    first.release()
    assert eng.stats.requests == 1 and eng.stats.prompt_tokens == 2000


async def test_an_unreadable_ahead_figure_keeps_the_request_where_it_was_sent(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    """An engine's ``x-kvmarina-ahead`` only refines routing: a value that is no number
    is ignored, and the request is answered by the pod it was sent to."""
    served: list[str] = []

    def pod_app(name: str, ahead: str) -> web.Application:
        async def completions(request: web.Request) -> web.StreamResponse:
            await request.read()
            served.append(name)
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", AHEAD_HEADER: ahead}
            )
            await resp.prepare(request)
            await resp.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", lambda _r: web.json_response({"status": "ok"}))
        return app

    pods = []
    for i, ahead in enumerate(("a great many", "0")):
        runner, url = await serve_app(pod_app(f"p{i}", ahead))
        fleet.runners.append(runner)
        pods.append({"name": f"p{i}", "url": url, "node": f"n{i}"})
    router, url = await fleet.router(router_doc(pods))
    assert await first_token_s(http, url, "x" * 400) > 0  # the first cold decision: p0
    assert served == ["p0"] and router.metrics.moves.value == 0
