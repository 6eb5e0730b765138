"""The engine's OpenAI API, served by a real engine process on loopback."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from kvmarina.engine.openai import StopChecker


async def post(url: str, path: str, body: object, **kw: object) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body, **kw) as r:
        return r.status, await r.json(content_type=None)


async def test_completion_greedy_is_deterministic(engine_url: str) -> None:
    body = {
        "model": "tiny",
        "prompt": "The KV cache lives on the node.",
        "max_tokens": 6,
        "temperature": 0,
    }
    s1, r1 = await post(engine_url, "/v1/completions", body)
    s2, r2 = await post(engine_url, "/v1/completions", body)
    assert s1 == s2 == 200
    assert r1["choices"][0]["text"] == r2["choices"][0]["text"]  # type: ignore[index]
    use = r1["usage"]  # type: ignore[index]
    assert use["completion_tokens"] == 6 and use["prompt_tokens"] == 31
    assert use["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chat_streams_chunks_and_usage(engine_url: str) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(engine_url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                chunks.append(line[6:].strip())
    assert chunks[-1] == b"[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 5
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals and finals[0]["choices"][0]["finish_reason"] == "length"


async def test_concurrent_requests_batch(engine_url: str) -> None:
    body = {"model": "tiny", "prompt": "x" * 50, "max_tokens": 8, "temperature": 0}
    results = await asyncio.gather(*(post(engine_url, "/v1/completions", body) for _ in range(6)))
    texts = {r["choices"][0]["text"] for _, r in results}  # type: ignore[index]
    assert all(s == 200 for s, _ in results) and len(texts) == 1


async def test_openai_style_errors(engine_url: str) -> None:
    cases = [
        ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, "temperature"),
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 400, "model"),
        ({"model": "tiny", "prompt": "x" * 5000}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        got, r = await post(engine_url, "/v1/completions", body)
        assert got == status, (body, r)
        assert r["error"]["param"] == param  # type: ignore[index]
    async with (
        aiohttp.ClientSession() as s,
        s.post(engine_url + "/v1/completions", data=b"{not json") as r,
    ):
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
    got, r = await post(
        engine_url,
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
    )
    assert got == 400 and r["error"]["param"] == "messages"  # type: ignore[index]


async def test_models_health_metrics(engine_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(engine_url + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "tiny"
        async with s.get(engine_url + "/metrics") as r:
            text = await r.text()
    assert "kvmarina_engine_ttft_seconds_bucket" in text
    assert "kvmarina_engine_prompt_tokens_total" in text


def test_stop_checker_holds_back_partial_stops() -> None:
    sc = StopChecker(("END",))
    assert sc.push("abc") == "abc"
    assert sc.push("abcE") == ""
    assert sc.push("abcEN") == ""
    assert sc.push("abcENX") == "ENX"
    assert sc.push("abcENXEND tail") == ""
    assert sc.stopped
