"""The router process wired as an aiohttp app: its routes (the OpenAI endpoints go to
``proxy``), ``/v1/models``, ``/health``, ``/metrics``; startup and shutdown; config
reloads; and the background tasks that keep the routing state current (health checks,
engines' load, agents' and engines' event streams, bandwidth, index sweeping)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from kvmarina.router.admission import Admission
from kvmarina.router.config import ConfigError, RouterConfig, load_config
from kvmarina.router.engine_load import parse_load
from kvmarina.router.forward import Forwarder
from kvmarina.router.metrics import RouterMetrics
from kvmarina.router.pods import PodState
from kvmarina.router.proxy import Proxy
from kvmarina.router.reply import AiohttpReply, read_body
from kvmarina.router.requests import ENDPOINTS, BadRequest
from kvmarina.router.routing import RoutingCore, pod_domain
from kvmarina.router.subscriber import NodeFollower
from kvmarina.router.upstream import UpstreamPool
from kvmarina.router.vllm_events import PodBlocks
from kvmarina.router.vllm_follower import VLLMFollower
from kvmarina.tokenizer import Tokenizer, load_tokenizer

#: how often a paused check (its interval set to 0) looks at the config again
IDLE_CHECK_S = 1.0

log = logging.getLogger("kvmarina.router")


class Router:
    """One router process. ``config_path`` (if given) is watched and reloaded."""

    def __init__(
        self,
        cfg: RouterConfig,
        config_path: str | Path | None = None,
        reload_interval_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.reload_interval_s = reload_interval_s
        self.core = RoutingCore(cfg)
        self.tokenizer: Tokenizer = load_tokenizer(cfg.tokenizer_dir)
        self.admission = Admission(
            cfg.limits.max_inflight, cfg.limits.max_queue, cfg.limits.queue_timeout_s
        )
        self.metrics = RouterMetrics()
        self.followers: dict[str, NodeFollower] = {}
        self.vllm: dict[str, VLLMFollower] = {}  # pod name -> its KV-event follower
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._mtime = self._config_mtime()
        self.reloads = 0
        # the request path; its upstream pool is replaced with a sized one at startup
        upstream = UpstreamPool(cfg.limits.connect_timeout_s)
        self.forwarder = Forwarder(
            self.core, self.metrics, self.vllm, upstream, cfg.limits.request_timeout_s
        )
        self.proxy = Proxy(
            cfg, self.tokenizer, self.core, self.admission, self.metrics, self.forwarder
        )

    # -- lifecycle ------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.limits.max_body_bytes + 1)
        for path, kind in ENDPOINTS.items():
            app.router.add_post(path, functools.partial(self._proxied, kind=kind, path=path))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        lim = self.cfg.limits
        connector = aiohttp.TCPConnector(
            limit=max(64, lim.max_inflight + 16), limit_per_host=0, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.forwarder.upstream = UpstreamPool(
            lim.connect_timeout_s, max_idle=max(64, lim.max_inflight)
        )
        self._events_session = aiohttp.ClientSession()
        self._sync_followers()
        loops = (
            self._health_loop(),
            self._load_loop(),
            self._sweep_loop(),
            self._reload_loop(),
            self._bandwidth_loop(),
        )
        for coro in loops:
            self._tasks.append(asyncio.create_task(coro))

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(f.stop() for f in self.followers.values()))
        await asyncio.gather(*(f.stop() for f in self.vllm.values()))
        if self.session is not None:
            await self.session.close()
        self.forwarder.upstream.close()
        await self._events_session.close()

    def _on_live(self, node: str, live: bool) -> None:
        if live:
            self.core.live_nodes.add(node)
        else:
            self.core.live_nodes.discard(node)

    def _sync_followers(self) -> None:
        wanted: dict[str, str] = {}
        for p in self.cfg.pods:
            if p.agent_url and p.node not in wanted:
                wanted[p.node] = p.agent_url
        for node in list(self.followers):
            f = self.followers[node]
            if wanted.get(node) != f.agent_url.rstrip("/") and wanted.get(node) != f.agent_url:
                self._background(f.stop())
                del self.followers[node]
                self.core.index.drop_node(node)
        for node, url in wanted.items():
            if node not in self.followers:
                f = NodeFollower(
                    node,
                    url,
                    self.core.index,
                    self._on_live,
                    self._events_session,
                    on_cleared=self.core.forget_node,
                    on_load=self.core.note_pushed_load,
                )
                self.followers[node] = f
                f.start()
        self._sync_vllm_followers()

    def _sync_vllm_followers(self) -> None:
        """One follower per vLLM pod with a KV-event publisher; a pod whose URLs, model
        identity or contract changed is followed anew."""
        cfg = self.cfg
        wanted = {p.name: p for p in cfg.pods if cfg.engine == "vllm" and p.kv_events is not None}
        for name, f in list(self.vllm.items()):
            p = wanted.get(name)
            b = f.blocks
            if (
                p is None
                or (p.kv_events, p.kv_replay) != (f.events_url, f.replay_url)
                or (b.contract, b.identity) != (self.core.contract, cfg.model_identity)
            ):
                self._background(f.stop())
                del self.vllm[name]
                b.clear()
        for name, p in wanted.items():
            if name not in self.vllm:
                assert p.kv_events is not None
                blocks = PodBlocks(
                    pod_domain(name), self.core.index, self.core.contract, cfg.model_identity
                )
                f = self.vllm[name] = VLLMFollower(
                    name, p.kv_events, p.kv_replay, blocks, self._on_live
                )
                f.start()

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    # -- background loops -------------------------------------------------------------
    async def _bandwidth_loop(self, interval_s: float = 10.0) -> None:
        """Learn each node's measured pull bandwidth from its agent's /stats, so the
        migration-vs-recompute estimate uses what transfers actually achieved."""
        while True:
            for node, f in list(self.followers.items()):
                try:
                    async with self._events_session.get(
                        f.agent_url.rstrip("/") + "/stats", timeout=aiohttp.ClientTimeout(total=2)
                    ) as r:
                        stats = await r.json()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    continue
                peers = (stats.get("transfer") or {}).get("peers") or {}
                rates = [p["gbps"] * 1e9 for p in peers.values() if p.get("gbps")]
                if rates:
                    self.core.bandwidth[node] = max(rates)
            await asyncio.sleep(interval_s)

    async def _each_pod(self, check: Any, interval: Callable[[], float]) -> None:
        """``check`` every pod every ``interval()`` seconds, read from the config each
        round (a reload changes it; 0 pauses the checks until it is set again)."""
        while True:
            every = interval()
            if every > 0:
                await asyncio.gather(*(check(p) for p in list(self.core.pods.values())))
            await asyncio.sleep(every if every > 0 else IDLE_CHECK_S)

    async def _health_loop(self) -> None:
        await self._each_pod(self._check, lambda: self.cfg.limits.health_interval_s)

    async def _load_loop(self) -> None:
        """The engines' own load figures (``engine_load``), for what other routers sent."""
        await self._each_pod(self._poll_load, lambda: self.cfg.limits.load_interval_s)

    async def _get_text(self, pod: PodState, path: str) -> str | None:
        """The body of a 200 answer to ``GET <pod>/<path>``; ``None`` for anything else."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.cfg.limits.connect_timeout_s))
        try:
            async with self.session.get(f"{pod.cfg.url}{path}", timeout=timeout) as resp:
                text = await resp.text(errors="replace")
                return text if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def _check(self, pod: PodState) -> None:
        ok = await self._get_text(pod, "/health") is not None
        if ok != pod.healthy:
            log.info("pod %s is now %s", pod.name, "healthy" if ok else "unhealthy")
            follower = self.vllm.get(pod.name)
            if not ok and follower is not None:
                follower.forget("it failed its health check")
        pod.healthy = ok

    async def _poll_load(self, pod: PodState) -> None:
        asked = time.monotonic()
        prefilling = pod.prefilling
        load = parse_load(await self._get_text(pod, "/metrics") or "")
        if pod.engine_at > asked:
            return  # an answer's load header came while the poll ran: it is fresher
        if load is None and pod.engine is not None and pod.engine.queued_tokens is not None:
            return  # the engine reports on its answers only; keep the last report
        pod.note_engine(load, time.monotonic(), prefilling)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.core.index.sweep()
            self.core.approx.sweep()

    def _config_mtime(self) -> float:
        try:
            return self.config_path.stat().st_mtime if self.config_path else 0.0
        except OSError:
            return 0.0

    async def _reload_loop(self) -> None:
        while self.config_path is not None:
            await asyncio.sleep(self.reload_interval_s)
            mtime = self._config_mtime()
            if mtime != self._mtime:
                self._mtime = mtime
                self.reload()

    def reload(self) -> bool:
        """Re-read the config file; keep the old config on any error."""
        assert self.config_path is not None
        try:
            cfg = load_config(self.config_path)
            tok = load_tokenizer(cfg.tokenizer_dir)
        except (ConfigError, ValueError) as exc:
            log.error("config reload failed, keeping the previous config: %s", exc)
            return False
        self.apply(cfg, tok)
        return True

    def apply(self, cfg: RouterConfig, tok: Tokenizer | None = None) -> None:
        self.cfg = cfg
        if tok is not None:
            self.tokenizer = tok
        self.core.apply_config(cfg)
        self.proxy.apply(cfg, tok)
        lim = cfg.limits
        self.admission.resize(lim.max_inflight, lim.max_queue, lim.queue_timeout_s)
        self._sync_followers()
        self.reloads += 1
        log.info("config applied: %d pods, policy %s", len(cfg.pods), cfg.routing.policy)

    # -- plain endpoints ----------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "kvmarina"}
                ],
            }
        )

    def health_doc(self) -> dict[str, Any]:
        pods: dict[str, dict[str, Any]] = {
            p.name: {
                "node": p.node,
                "healthy": p.healthy,
                "breaker": p.breaker.state,
                "inflight": p.inflight,
            }
            for p in self.core.pods.values()
        }
        for name, f in self.vllm.items():
            if name in pods:
                pods[name]["kv_events"] = f.health()
        available = sum(1 for p in self.core.pods.values() if p.available())
        return {
            "status": "ok"
            if available == len(pods)
            else ("degraded" if available else "unavailable"),
            "mode": self.core.mode,
            "live_event_streams": sorted(self.core.live_nodes),
            "index_blocks": len(self.core.index),
            "approx_blocks": len(self.core.approx),
            "policy": self.cfg.routing.policy,
            "pods": pods,
        }

    async def _health(self, request: web.Request) -> web.Response:
        doc = self.health_doc()
        return web.json_response(doc, status=200 if doc["status"] != "unavailable" else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        m, core = self.metrics, self.core
        for name, idx in (("events", core.index), ("approximate", core.approx)):
            m.index_blocks.labels(name).set(len(idx))
            m.index_evictions.labels(name).set(idx.evictions)
        m.index_cap.set(core.index.max_blocks)
        for mode in ("events", "mixed", "approximate"):
            m.mode.labels(mode).set(1 if core.mode == mode else 0)
        m.live_nodes.set(len(core.live_nodes))
        for node, f in self.followers.items():
            m.events.labels(node).set(f.events)
        for name, v in self.vllm.items():
            m.engine_events(name, v.health())
        for p in core.pods.values():
            m.pod_inflight.labels(p.name).set(p.inflight)
            m.pod_healthy.labels(p.name).set(1 if p.available() else 0)
            m.pod_rate.labels(p.name).set(p.prefill_tps)
            m.pod_pushed.labels(p.name).set(p.pushed)
        m.pull_latency.set(core.pull_latency(time.monotonic()))
        m.queue.set(self.admission.queued)
        m.inflight.set(self.admission.inflight)
        return web.Response(
            body=generate_latest(m.registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    # -- the proxy ----------------------------------------------------------------------
    # (``router.front`` serves plain POSTs to the endpoints without aiohttp; this
    # handler serves the rest, and apps served by aiohttp alone)
    async def _proxied(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        reply = AiohttpReply(request)
        try:
            raw = await read_body(request, self.cfg.limits.max_body_bytes)
        except BadRequest as exc:
            await self.proxy.reject(reply, kind, exc)
        else:
            await self.proxy.handle(request.headers, raw, reply, kind, path)
        assert reply.response is not None, "the request path answers every request"
        return reply.response
