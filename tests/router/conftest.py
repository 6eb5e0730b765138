"""Fixtures: simulated engines and routers served for real on loopback (port 0)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvmarina.engine.simulate import SimConfig, SimEngine
from kvmarina.router.config import RouterConfig, parse_config
from kvmarina.router.front import Front
from kvmarina.router.server import Router

IDENT = "sim@v1|simulated|tp0of1"


async def serve_app(app: web.Application | web.AppRunner) -> tuple[web.AppRunner, str]:
    runner = app if isinstance(app, web.AppRunner) else web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def router_doc(pod_list: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": "sim",
        "model_identity": IDENT,
        "serving": "s",
        "namespace": "ns",
        "pods": pod_list,
        "limits": {"health_interval_s": 0.2, "breaker_cooldown_s": 0.3},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


class Fleet:
    """Started apps; ``close`` tears everything down (called by the fixture)."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner | Front] = []
        self.engines: list[SimEngine] = []
        self.urls: list[str] = []

    async def engine(self, **kw: Any) -> tuple[SimEngine, str]:
        kw.setdefault("model_identity", IDENT)
        kw.setdefault("prefill_tps", 0.0)
        kw.setdefault("decode_tps", 0.0)
        eng = SimEngine(SimConfig(**kw))
        runner, url = await serve_app(eng.runner())
        self.runners.append(runner)
        self.engines.append(eng)
        return eng, url

    async def router(
        self, cfg: RouterConfig | dict[str, Any], path: Any = None
    ) -> tuple[Router, str]:
        if isinstance(cfg, dict):
            cfg = parse_config(cfg)
        r = Router(cfg, path, reload_interval_s=0.1)
        front = await Front.start(r, "127.0.0.1", 0)  # served as ``kvmarina router`` serves it
        self.runners.append(front)
        return r, f"http://127.0.0.1:{front.port}"

    async def close(self) -> None:
        for r in reversed(self.runners):
            await (r.close() if isinstance(r, Front) else r.cleanup())


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        await f.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def wait_for(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, every: float = 0.02
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        res = cond()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


@pytest.fixture
async def scripted() -> AsyncIterator[list[Any]]:
    """``ScriptedPods`` started by a test (``scripted.routed``), closed after it."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for pods in started:
            await pods.close()
