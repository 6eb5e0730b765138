"""The router's HTTP front door (aiohttp): OpenAI endpoints proxied to the chosen
pod, ``/v1/models``, ``/health``, ``/metrics``; background tasks for health checks,
agent event streams, index sweeping and config reloads."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from kvmarina.headers import PULL_HEADER, SALT_HEADER
from kvmarina.load_report import LOAD_HEADER, EngineLoad, parse_load_header
from kvmarina.router.admission import Admission, Rejected
from kvmarina.router.config import ConfigError, RouterConfig, load_config
from kvmarina.router.engine_load import parse_load
from kvmarina.router.headers import STRIPPED_HEADERS, raw_value
from kvmarina.router.metrics import RouterMetrics
from kvmarina.router.pods import PodState
from kvmarina.router.requests import BadRequest, ParsedRequest, parse_body, parse_request
from kvmarina.router.routing import Decision, NoPodAvailable, RoutingCore, pod_domain
from kvmarina.router.subscriber import NodeFollower
from kvmarina.router.tenancy import derive_salt
from kvmarina.router.upstream import UpstreamError, UpstreamPool
from kvmarina.router.vllm_events import PodBlocks
from kvmarina.router.vllm_follower import VLLMFollower
from kvmarina.router.vllm_request import vllm_request, with_pull
from kvmarina.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("kvmarina.router")
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_ATTEMPTS = 3


class UpstreamFailed(Exception):
    """The pod failed before sending a first byte: the next pod may be tried."""


def error_response(
    status: int, message: str, *, retry_after: int | None = None, kind: str | None = None
) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": kind or ("invalid_request_error" if status < 500 else "service_unavailable"),
            "param": None,
            "code": None,
        }
    }
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


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
        self._routed_children: dict[str, Any] = {}
        self._answered_children: dict[tuple[str, int], Any] = {}
        self._load_reports: dict[str, EngineLoad | None] = {}
        self.upstream = UpstreamPool(cfg.limits.connect_timeout_s)

    def _answered(self, kind: str, status: int) -> Any:
        """The requests counter of ``kind`` and ``status`` (label lookups cost more than
        the increment, so the children are kept)."""
        child = self._answered_children.get((kind, status))
        if child is None:
            child = self.metrics.requests.labels(kind, str(status))
            self._answered_children[kind, status] = child
        return child

    def _load_report(self, value: str | None) -> EngineLoad | None:
        """``parse_load_header``, memoized: an engine's reports repeat a few values."""
        if value is None:
            return None
        try:
            return self._load_reports[value]
        except KeyError:
            if len(self._load_reports) >= 4096:
                self._load_reports.clear()
            load = self._load_reports[value] = parse_load_header(value)
            return load

    def _routed(self, pod: str) -> Any:
        child = self._routed_children.get(pod)
        if child is None:
            child = self._routed_children[pod] = self.metrics.routed.labels(pod)
        return child

    # -- lifecycle ------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.limits.max_body_bytes + 1)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
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
        self.upstream = UpstreamPool(lim.connect_timeout_s, max_idle=max(64, lim.max_inflight))
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
        self.upstream.close()
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

    async def _each_pod(self, check: Any, interval_s: float) -> None:
        while interval_s > 0:
            await asyncio.gather(*(check(p) for p in list(self.core.pods.values())))
            await asyncio.sleep(interval_s)

    async def _health_loop(self) -> None:
        await self._each_pod(self._check, self.cfg.limits.health_interval_s)

    async def _load_loop(self) -> None:
        """The engines' own load figures (``engine_load``), for what other routers sent."""
        await self._each_pod(self._poll_load, self.cfg.limits.load_interval_s)

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
        load = parse_load(await self._get_text(pod, "/metrics") or "")
        if load is not None or pod.engine is None or pod.engine.queued_tokens is None:
            pod.note_engine(load, time.monotonic())  # a header's report is fresher

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
        m.queue.set(self.admission.queued)
        m.inflight.set(self.admission.inflight)
        return web.Response(
            body=generate_latest(m.registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    # -- the proxy ----------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "completions", "/v1/completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "chat", "/v1/chat/completions")

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BadRequest(
                f"request body of {request.content_length} bytes exceeds the "
                f"limit of {limit} bytes",
                status=413,
            )
        if request.content_length is not None:
            return await request.read()
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body exceeds the limit of {limit} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _proxy(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        try:
            raw = await self._read_body(request)
            parsed = parse_request(parse_body(raw), kind, self.cfg.model, self.tokenizer)
        except BadRequest as exc:
            self.metrics.requests.labels(kind, str(exc.status)).inc()
            return web.json_response(exc.body(), status=exc.status)
        salt = derive_salt(self.cfg.sharing, self.cfg.namespace, self.cfg.serving, request.headers)
        try:
            await self.admission.acquire()
        except Rejected as exc:
            self.metrics.rejected.inc()
            self.metrics.requests.labels(kind, "429").inc()
            return error_response(
                429,
                f"the router is at capacity ({exc}); retry later",
                retry_after=self.cfg.limits.retry_after_s,
                kind="rate_limit_error",
            )
        try:
            return await self._route(request, kind, path, raw, parsed, salt)
        finally:
            self.admission.release()

    async def _route(
        self,
        request: web.Request,
        kind: str,
        path: str,
        raw: bytes,
        parsed: ParsedRequest,
        salt: str,
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            decision = self.core.decide(parsed.tokens, salt, request.headers)
        except NoPodAvailable as exc:
            self.metrics.requests.labels(kind, "503").inc()
            return error_response(503, str(exc), retry_after=self.cfg.limits.retry_after_s)
        self.metrics.decision.observe(time.perf_counter() - t0)
        headers = {
            k: raw_value(v) for k, v in request.headers.items() if k.lower() not in STRIPPED_HEADERS
        }
        headers[SALT_HEADER] = salt
        vllm_body = vllm_request(parsed.body, salt) if self.cfg.engine == "vllm" else None
        if vllm_body is not None:
            raw = json.dumps(vllm_body).encode()
        last_error = "no pod could be tried"
        for attempt, pod in enumerate(decision.first(MAX_ATTEMPTS)):
            if attempt and not pod.available():
                continue
            hint = decision.pull if attempt == 0 else None
            body = raw
            if hint is not None:
                headers[PULL_HEADER] = hint.format()
                self.metrics.pull_hints.inc()
                if vllm_body is not None:  # vLLM hands kv_transfer_params to the connector
                    body = json.dumps(with_pull(vllm_body, hint)).encode()
            else:
                headers.pop(PULL_HEADER, None)
            try:
                resp = await self._forward(request, pod, path, body, headers, parsed, decision)
            except UpstreamFailed as exc:
                last_error = f"pod {pod.name}: {exc}"
                log.warning("attempt %d failed on %s: %s", attempt + 1, pod.name, exc)
                self.metrics.retries.inc()
                continue
            self._answered(kind, resp.status).inc()
            return resp
        self.metrics.requests.labels(kind, "503").inc()
        return error_response(
            503, f"no pod answered: {last_error}", retry_after=self.cfg.limits.retry_after_s
        )

    async def _forward(
        self,
        request: web.Request,
        pod: PodState,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        parsed: ParsedRequest,
        decision: Decision,
    ) -> web.StreamResponse:
        bs = self.core.contract.block_size
        uncached = decision.uncached_tokens(pod, len(parsed.tokens), bs)
        now = time.monotonic()
        occupancy = pod.occupancy(now)
        queue_s = self.core.queued(pod, now) * pod.slowdown(now)
        queue_s /= pod.prefill_tps
        pod.breaker.on_attempt()
        pod.inflight += 1
        pod.queue_add(uncached, now)
        pod.note_sent(uncached)
        pending = uncached
        decoding = False
        out: web.StreamResponse | None = None
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.limits.request_timeout_s):
                try:
                    # the rest of the prompt's hashes (routing needed only its cached
                    # prefix) are for ``record_sent``: computed while the pod works
                    up = await self.upstream.post(
                        pod.cfg.url, path, raw, headers, decision.chain.all
                    )
                except UpstreamError as exc:
                    self._failed(pod)
                    raise UpstreamFailed(str(exc)) from exc
                try:
                    if up.status in RETRY_STATUSES:
                        self._failed(pod)
                        raise UpstreamFailed(f"HTTP {up.status}")
                    self._sent(pod, decision, len(parsed.tokens), uncached)
                    # the engine's load as it answers: this request's prefill is done
                    reported = self._load_report(up.headers.get(LOAD_HEADER))
                    if not parsed.stream:
                        try:
                            body = await up.read()
                        except UpstreamError as exc:
                            self._failed(pod)
                            raise UpstreamFailed(f"failed before the first byte: {exc}") from exc
                        ttft = time.perf_counter() - t0
                        self._first_byte(pod, ttft, uncached, queue_s, occupancy)
                        pod.queue_done(pending)
                        pending = 0
                        if reported is not None:
                            pod.note_engine(reported, time.monotonic())
                        pod.breaker.on_success()
                        return web.Response(
                            body=body, status=up.status, content_type=up.content_type
                        )
                    try:
                        async for chunk in up.iter_chunks():
                            if out is None:
                                ttft = time.perf_counter() - t0
                                self._first_byte(pod, ttft, uncached, queue_s, occupancy)
                                pod.queue_done(pending)
                                pending = 0
                                pod.decoding += 1
                                decoding = True
                                if reported is not None:
                                    pod.note_engine(reported, time.monotonic())
                                out = web.StreamResponse(status=up.status)
                                out.content_type = up.content_type
                                if "cache-control" in up.headers:
                                    out.headers["Cache-Control"] = up.headers["cache-control"]
                                await out.prepare(request)
                            await out.write(chunk)
                    except UpstreamError as exc:
                        self._failed(pod)
                        if out is None:
                            raise UpstreamFailed(f"failed before the first byte: {exc}") from exc
                        log.warning("pod %s failed mid-stream: %s", pod.name, exc)
                        return out  # the client sees a truncated stream
                finally:
                    up.release()
            if out is None:
                out = web.StreamResponse(status=up.status)
                await out.prepare(request)
            pod.breaker.on_success()
            await out.write_eof()
            return out
        except TimeoutError:
            self._failed(pod)
            if out is None:
                raise UpstreamFailed("timed out") from None
            return out
        finally:
            pod.inflight -= 1
            pod.queue_done(pending)
            if decoding:
                pod.decoding -= 1

    def _failed(self, pod: PodState) -> None:
        pod.breaker.on_failure()
        pod.failed += 1

    def _sent(self, pod: PodState, decision: Decision, n_tokens: int, uncached: int) -> None:
        pod.served += 1
        self._routed(pod.name).inc()
        follower = self.vllm.get(pod.name)
        if follower is not None and len(decision.hashes) > decision.cached_blocks.get(
            pod.domain, 0
        ):
            follower.expect()  # new full blocks: their BlockStored events are due
        self.core.record_sent(
            pod.domain, decision.hashes, max(decision.cached_blocks.values(), default=0), pod.name
        )
        self.metrics.prompt_tokens.inc(n_tokens)
        self.metrics.cached_tokens.inc(n_tokens - uncached)

    def _first_byte(
        self, pod: PodState, ttft: float, uncached: int, queue_s: float, occupancy: int
    ) -> None:
        self.metrics.ttft.observe(ttft)
        self.core.observe_ttft(pod, uncached, ttft, queue_s, occupancy)
