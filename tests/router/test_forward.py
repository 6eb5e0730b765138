"""One attempt on one pod, for every way it can end: the client's answer, the pod's
breaker and failure count, and the pod's load books back at zero afterwards (what an
attempt adds to ``inflight``, ``queued_tokens`` and ``decoding`` it takes back once)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvmarina.load_report import EngineLoad
from kvmarina.router.config import parse_config

from .conftest import Fleet, router_doc, serve_app, wait_for
from .scripted import BUSY, CHUNKED, END, HELLO, WHOLE, ScriptedPods, books, doc, post, routed


async def test_a_whole_answer_is_relayed_and_the_engine_report_noted(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [([WHOLE], False)])
    assert await post(url) == (200, b"{}")
    pod = router.core.pods["p0"]
    assert books(pod) == (0, 0, 0) and pod.served == 1 and pod.failed == 0
    assert pod.engine is not None and pod.engine.queued_tokens == 7
    assert pod.breaker.state == "closed"


async def test_a_whole_answer_larger_than_the_read_buffer_arrives_whole(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    """Past ``BUFFER_LIMIT`` buffered, the upstream connection stops reading from the pod
    until the body is taken: a 3 MiB answer still arrives byte for byte, and the
    connection goes back to the pool for the next request."""
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(big)}"
    answer = [(head + "\r\n\r\n").encode(), big[: 1 << 20], big[1 << 20 :]]
    router, url = await routed(fleet, scripted, [(answer, False), ([WHOLE], False)])
    assert await post(url) == (200, big)
    assert await post(url) == (200, b"{}")
    assert len(scripted[0].handlers) == 1  # both answers came over one connection
    assert books(router.core.pods["p0"]) == (0, 0, 0)


async def test_a_stream_counts_as_decoding_until_its_last_byte(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    more = asyncio.Event()
    router, url = await routed(fleet, scripted, [([CHUNKED, HELLO, more, HELLO, END], False)])
    pod = router.core.pods["p0"]
    body = {"model": "sim", "prompt": "x" * 64, "max_tokens": 2, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/completions", json=body) as r,
    ):
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert await r.content.readexactly(5) == b"hello"
        assert books(pod) == (1, 0, 1)  # prefilled (out of the queue), decoding
        more.set()
        assert await r.content.read() == b"hello"
    assert books(pod) == (0, 0, 0) and pod.failed == 0


async def test_a_stream_without_chunks_is_an_empty_answer(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [([CHUNKED, END], False)])
    assert await post(url, stream=True) == (200, b"")
    assert books(router.core.pods["p0"]) == (0, 0, 0)


async def test_a_busy_pod_is_retried_on_the_next(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [([BUSY], False), ([WHOLE], False)], n=2)
    assert await post(url) == (200, b"{}")
    pods = list(router.core.pods.values())
    assert sorted(p.failed for p in pods) == [0, 1] and sum(p.served for p in pods) == 1
    assert all(books(p) == (0, 0, 0) for p in pods)
    assert router.metrics.retries.value == 1


async def test_a_pod_failing_before_its_first_byte_is_retried(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [([CHUNKED], True), ([WHOLE], False)], n=2)
    assert await post(url, stream=True) == (200, b"{}")
    pods = list(router.core.pods.values())
    # it took the request (served) and then failed: both count
    assert sorted(p.failed for p in pods) == [0, 1] and sum(p.served for p in pods) == 2
    assert all(books(p) == (0, 0, 0) for p in pods)


async def test_a_pod_failing_mid_stream_truncates_the_clients_stream(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [([CHUNKED, HELLO], True)], n=2)
    status, got = await post(url, stream=True)
    assert status == 200 and got.startswith(b"hello")  # no second pod: the client had bytes
    assert router.metrics.retries.value == 0
    pods = list(router.core.pods.values())
    assert sorted(p.failed for p in pods) == [0, 1] and all(books(p) == (0, 0, 0) for p in pods)


async def test_the_request_timeout_follows_a_reload(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [None])
    pods = [{"name": p.name, "url": p.url, "node": p.node} for p in router.cfg.pods]
    router.apply(parse_config(doc(pods, request_timeout_s=0.3)))  # was 600 s
    status, got = await post(url)
    assert status == 503 and b"timed out" in got
    pod = router.core.pods["p0"]
    assert books(pod) == (0, 0, 0) and pod.failed == 1


async def test_a_stream_past_its_time_is_cut_and_an_outside_cancel_stays_one(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    """An attempt's limit fires after the client got the head: the client sees a cut
    body. A cancellation from outside (a router shutting down) is not taken for the
    attempt's limit: it propagates, and the books still settle."""
    never = asyncio.Event()
    router, url = await routed(
        fleet,
        scripted,
        [([CHUNKED, HELLO, never], False), ([CHUNKED, HELLO, never], False)],
        request_timeout_s=0.3,
    )
    t0 = time.monotonic()
    status, got = await post(url, stream=True)
    assert status == 200 and got == b"hello" and 0.3 <= time.monotonic() - t0 < 2.0
    pod = router.core.pods["p0"]
    assert books(pod) == (0, 0, 0) and pod.failed == 1

    router.forwarder.timeout_s = 600.0
    task = asyncio.create_task(post(url, stream=True))
    for _ in range(100):
        if pod.inflight:
            break
        await asyncio.sleep(0.02)
    served = [t for t in asyncio.all_tasks() if "FrontConnection._serve" in repr(t.get_coro())]
    assert len(served) == 1
    served[0].cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()  # the unfinished answer's connection was closed, not left open
    await asyncio.sleep(0.05)
    assert served[0].cancelled() and books(pod) == (0, 0, 0) and pod.failed == 1


async def test_a_load_poll_keeps_a_fresher_report_from_an_answer(fleet: Fleet) -> None:
    """An answer's load header (which counts queued prefill tokens) that arrives while
    a /metrics poll runs is fresher than the poll: the poll leaves it. Without one,
    the poll's figures are taken; a poll that reads nothing keeps the last header's."""
    answer = asyncio.Event()
    answer.set()
    text = ["vllm:num_requests_running 3\nvllm:num_requests_waiting 1\n"]

    async def metrics(_req: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(text=text[0])

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, pod_url = await serve_app(app)
    try:
        router, _ = await fleet.router(doc([{"name": "p0", "url": pod_url, "node": "n0"}]))
        pod = router.core.pods["p0"]
        await router._poll_load(pod)
        assert pod.engine == EngineLoad(3, 1)
        answer.clear()
        poll = asyncio.create_task(router._poll_load(pod))
        await asyncio.sleep(0.2)
        header = EngineLoad(1, 0, 7)
        pod.note_engine(header, time.monotonic())  # an answer's x-kvmarina-load meanwhile
        answer.set()
        await poll
        assert pod.engine == header
        text[0] = "# an engine that exports no load\n"
        await router._poll_load(pod)
        assert pod.engine == header
    finally:
        await runner.cleanup()


async def test_the_load_poll_interval_follows_a_reload(fleet: Fleet) -> None:
    """``limits.load_interval_s`` applies on a reload both ways: 0 pauses the /metrics
    polls (a paused loop looks at the config again), a positive value resumes them."""
    polls: list[float] = []

    async def metrics(_req: web.Request) -> web.Response:
        polls.append(time.monotonic())
        return web.Response(text="vllm:num_requests_running 2\nvllm:num_requests_waiting 0\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, pod_url = await serve_app(app)
    try:
        pods = [{"name": "p0", "url": pod_url, "node": "n0"}]
        router, _ = await fleet.router(doc(pods))  # load_interval_s 0
        await asyncio.sleep(0.3)
        assert polls == []
        router.apply(parse_config(doc(pods, load_interval_s=0.05)))
        await wait_for(lambda: len(polls) >= 3)
        assert router.core.pods["p0"].engine == EngineLoad(2, 0)
        router.apply(parse_config(doc(pods, load_interval_s=0)))
        await asyncio.sleep(0.2)
        seen = len(polls)
        await asyncio.sleep(0.3)
        assert len(polls) == seen
    finally:
        await runner.cleanup()


async def test_a_pulling_attempt_teaches_the_pull_latency_not_the_prefill_rate(
    fleet: Fleet, scripted: list[ScriptedPods], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router sent a pull hint: the time to the first byte beyond the queue and the
    prefill it expected is what the pull cost, not a slow prefill."""
    from kvmarina.headers import PullHint
    from kvmarina.router.decision import Decision

    late = asyncio.Event()
    router, url = await routed(fleet, scripted, [([late, WHOLE], False)])
    core = router.core
    pod = core.pods["p0"]
    real = core.decide

    def hinted(tokens: Any, salt: str, headers: Any = None) -> Decision:
        d = real(tokens, salt, headers)
        return Decision([pod], d.prompt, {}, 0.0, PullHint("n9", "http://127.0.0.1:1", 4))

    monkeypatch.setattr(core, "decide", hinted)
    asyncio.get_running_loop().call_later(0.2, late.set)
    rate = pod.prefill_tps
    assert await post(url) == (200, b"{}")
    # one EWMA step (0.2) of a sample of about 0.2 s (less the prefill it expected)
    assert 0.2 * 0.15 < core.pull_latency(time.monotonic()) < 0.2 * 0.3
    assert pod.prefill_tps == rate and books(pod) == (0, 0, 0)


async def test_only_a_decision_that_looked_the_prompt_up_teaches_the_prefill_rate(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    """Round-robin looks nothing up, so it takes every prompt for uncached: a quick
    answer (a hit it did not know of) would teach a far too fast rate, and the whole
    prompt a far too heavy usual request, which a cache-aware policy switched on later
    would place by. Cache-aware's TTFTs and prompts teach."""
    router, url = await routed(fleet, scripted, [([WHOLE], False), ([WHOLE], False)])
    pod = router.core.pods["p0"]
    rate = pod.prefill_tps
    assert await post(url) == (200, b"{}")
    assert pod.prefill_tps == rate and pod.tokens_per_request == 0.0
    pods = [{"name": p.name, "url": p.url, "node": p.node} for p in router.cfg.pods]
    limits = {"health_interval_s": 0, "load_interval_s": 0}
    router.apply(parse_config(router_doc(pods, routing={"policy": "cache-aware"}, limits=limits)))
    body = {"model": "sim", "prompt": "y" * 256, "max_tokens": 2}  # a prompt not sent before
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200 and await r.read() == b"{}"
    assert pod.prefill_tps > rate and books(pod) == (0, 0, 0)
    assert pod.tokens_per_request > 0.0


async def test_a_chunked_answer_is_relayed_as_it_came_whatever_the_reads_cut(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    """A stream is copied framing and all (``iter_framed``), not taken apart and framed
    again: reads that cut a size line, a chunk extension, a chunk whose data looks like
    the last chunk, and trailers still give the client the pod's exact payload, and the
    pod's connection is reused."""
    pieces: list[bytes] = [
        b"5\r\nhe", b"llo\r\n", b"1", b"0;ext=1\r\n0123456789abcdef\r\n",
        b"3\r\n0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n", b"\r\n",
    ]  # fmt: skip
    gates = [asyncio.Event() for _ in pieces]
    parts: list[bytes | asyncio.Event] = [CHUNKED]
    for gate, piece in zip(gates, pieces, strict=True):
        parts += [gate, piece]
    router, url = await routed(fleet, scripted, [(parts, False), ([CHUNKED, HELLO, END], False)])
    loop = asyncio.get_running_loop()
    for i, gate in enumerate(gates):
        loop.call_later(0.05 * (i + 1), gate.set)
    assert await post(url, stream=True) == (200, b"hello0123456789abcdef0\r\n")
    assert await post(url, stream=True) == (200, b"hello")
    pod = router.core.pods["p0"]
    assert pod.failed == 0 and books(pod) == (0, 0, 0)
    assert len(scripted[0].handlers) == 1  # both answers came over one connection


async def test_a_pod_cut_off_inside_a_chunk_leaves_the_client_a_cut_body(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    router, url = await routed(fleet, scripted, [([CHUNKED, b"5\r\nhe"], True)])
    body = {"model": "sim", "prompt": "x" * 64, "max_tokens": 2, "stream": True}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # not a complete body that happens to be short
    assert router.core.pods["p0"].failed == 1
