"""Replay a workload against an OpenAI-compatible URL and measure what users feel.

Each request is sent at its scheduled time (open loop, bounded concurrency) as a
streaming completion; time to first token is the time to the first content
chunk, and the final usage chunk says how many prompt tokens were cached.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvmarina.local.workload import WorkRequest


@dataclass(slots=True)
class Result:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


@dataclass(slots=True)
class Summary:
    """Figures of one replay."""

    policy: str
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    hit_rate: float
    cached_tokens: int
    prompt_tokens: int
    req_per_s: float
    ttfts_ms: list[float] = field(default_factory=list)
    #: blocks the agents pulled from peers during the replay (filled by the caller,
    #: who can read the agents' /stats; the replay itself only sees the router)
    migrated_blocks: int = 0

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ttfts_ms"}


def quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, req: WorkRequest, headers: dict[str, str]
) -> Result:
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    hdrs = dict(headers)
    if req.session:
        hdrs["x-session-id"] = req.session
    t0 = time.perf_counter()
    first: float | None = None
    res = Result(ok=False)
    try:
        async with session.post(url + "/v1/completions", json=body, headers=hdrs) as resp:
            if resp.status != 200:
                return Result(False, error=f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if first is None:
                    first = time.perf_counter()
                chunk = _json(line[6:])
                use = chunk.get("usage") if chunk else None
                if use:
                    res.prompt_tokens = int(use.get("prompt_tokens", 0))
                    details = use.get("prompt_tokens_details") or {}
                    res.cached_tokens = int(details.get("cached_tokens", 0) or 0)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    res.ok = first is not None
    res.ttft_s = (first or end) - t0
    res.latency_s = end - t0
    return res


def _json(raw: bytes) -> dict[str, Any] | None:
    import json

    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def replay(
    url: str,
    model: str,
    work: Sequence[WorkRequest],
    *,
    policy: str = "",
    concurrency: int = 16,
    headers: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 120.0,
) -> Summary:
    sem = asyncio.Semaphore(concurrency)
    results: list[Result] = []
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:

        async def run(req: WorkRequest) -> None:
            delay = req.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                results.append(await _one(session, url, model, req, headers or {}))
            if progress:
                progress(len(results), len(work))

        await asyncio.gather(*(run(r) for r in work))
    elapsed = time.perf_counter() - start
    return summarize(policy, results, elapsed)


def summarize(policy: str, results: Sequence[Result], elapsed: float) -> Summary:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return Summary(
        policy=policy,
        requests=len(results),
        errors=len(results) - len(ok),
        ttft_p50_ms=round(statistics.median(ttfts), 2) if ttfts else float("nan"),
        ttft_p90_ms=round(quantile(ttfts, 0.9), 2),
        hit_rate=round(cached / prompt, 4) if prompt else 0.0,
        cached_tokens=cached,
        prompt_tokens=prompt,
        req_per_s=round(len(ok) / elapsed, 3) if elapsed > 0 else 0.0,
        ttfts_ms=ttfts,
    )
