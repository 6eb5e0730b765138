"""The engine's HTTP front: OpenAI-compatible endpoints over the scheduler.

aiohttp on the event loop; the model runs on the scheduler's thread. Tokens
come back through a per-request ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``, so no handler ever blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvmarina.engine.kvstore import KVStore
from kvmarina.engine.openai import (
    SSE_DONE,
    ParsedRequest,
    RequestError,
    ResponseWriter,
    StopChecker,
    error_body,
    parse_request,
    usage,
)
from kvmarina.engine.scheduler import Output, QueueFull, Scheduler, SchedulerStats, Sequence
from kvmarina.headers import PULL_HEADER, SALT_HEADER, PullHint, PullHintError, parse_pull_hint
from kvmarina.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model_name: str
    max_model_len: int
    trust_salt_header: bool = False
    default_salt: str = ""
    retry_after_s: int = 1


class Metrics:
    """The engine's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram(
            "kvmarina_engine_ttft_seconds", "Time to first token", registry=r, buckets=buckets
        )
        self.tpot = Histogram(
            "kvmarina_engine_tpot_seconds", "Time per output token", registry=r, buckets=buckets
        )
        self.running = Gauge("kvmarina_engine_running", "Sequences running", registry=r)
        self.waiting = Gauge("kvmarina_engine_waiting", "Requests waiting", registry=r)
        self.prompt_tokens = Counter("kvmarina_engine_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "kvmarina_engine_cached_prompt_tokens",
            "Prompt tokens served from the KV cache",
            registry=r,
        )
        self.generated = Counter(
            "kvmarina_engine_generation_tokens", "Tokens generated", registry=r
        )
        self.requests = Counter(
            "kvmarina_engine_requests", "Requests by outcome", ["outcome"], registry=r
        )
        self.kv_used = Gauge(
            "kvmarina_engine_kv_pages_used", "KV blocks held by running sequences", registry=r
        )
        self._last = SchedulerStats()

    def on_step(self, s: SchedulerStats) -> None:
        # Called on the scheduler thread; prometheus_client is thread-safe.
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        self.prompt_tokens.inc(s.prompt_tokens - self._last.prompt_tokens)
        self.cached_tokens.inc(s.cached_prompt_tokens - self._last.cached_prompt_tokens)
        self.generated.inc(s.generated_tokens - self._last.generated_tokens)
        self._last = SchedulerStats(**vars(s))


class EngineServer:
    def __init__(
        self,
        cfg: ServerConfig,
        scheduler: Scheduler,
        store: KVStore,
        tokenizer: Tokenizer,
        metrics: Metrics,
    ) -> None:
        self.cfg, self.scheduler, self.store = cfg, scheduler, store
        self.tokenizer, self.metrics = tokenizer, metrics

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_view)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.cfg.model_name,
                        "object": "model",
                        "owned_by": "kvmarina",
                        "max_model_len": self.cfg.max_model_len,
                    }
                ],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.store.usage()})

    async def metrics_view(self, request: web.Request) -> web.Response:
        usage_now = self.store.usage()
        if "blocks_held" in usage_now:
            self.metrics.kv_used.set(usage_now["blocks_held"])
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------ one request

    def _salt(self, request: web.Request) -> str:
        if self.cfg.trust_salt_header and SALT_HEADER in request.headers:
            return request.headers[SALT_HEADER]
        return self.cfg.default_salt

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            raw = await request.read()
            req = parse_request(
                raw, kind, self.cfg.model_name, self.tokenizer, self.cfg.max_model_len
            )
            pull = parse_pull(request.headers.get(PULL_HEADER))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body exceeds {MAX_BODY} bytes", "invalid_request_error")
        except RequestError as exc:
            self.metrics.requests.labels("rejected").inc()
            return web.json_response(exc.body(), status=exc.status)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()

        def emit(out: Output) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        salt = self._salt(request)
        prefetch = getattr(self.store, "prefetch", None)
        if pull is not None and prefetch is not None:
            await asyncio.to_thread(prefetch, req.prompt_tokens, salt, pull)
            pull = None
        seq = Sequence(req.prompt_tokens, req.params, emit, salt=salt, pull=pull)
        try:
            self.scheduler.submit(seq)
        except QueueFull as exc:
            self.metrics.requests.labels("queue_full").inc()
            resp = _error(429, f"engine busy: {exc}", "rate_limit_exceeded")
            resp.headers["Retry-After"] = str(self.cfg.retry_after_s)
            return resp
        try:
            if req.stream:
                return await self._stream(request, req, seq, queue)
            return await self._collect(req, seq, queue)
        finally:
            # A finished sequence is already closed: cancelling it is a no-op. A stop
            # string or a client that went away ends the rest here.
            self.scheduler.cancel(seq)

    async def _collect(
        self, req: ParsedRequest, seq: Sequence, queue: asyncio.Queue[Output]
    ) -> web.Response:
        writer, stops = ResponseWriter(req), StopChecker(req.params.stop)
        text, finish = "", "length"
        async for tokens, reason in self._outputs(seq, queue):
            text += stops.push(self.tokenizer.decode(tokens))
            if stops.stopped:
                finish = "stop"
                break
            if reason is not None:
                text += stops.flush(self.tokenizer.decode(tokens))
                finish = reason
        if finish == "error":
            self.metrics.requests.labels("error").inc()
            return _error(503, "the engine could not finish this request", "server_error")
        self._observe(seq)
        use = usage(len(seq.prompt), len(seq.output), seq.cached_len)
        return web.json_response(writer.full(text, finish, use))

    async def _stream(
        self, request: web.Request, req: ParsedRequest, seq: Sequence, queue: asyncio.Queue[Output]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        writer, stops = ResponseWriter(req), StopChecker(req.params.stop)
        finish: str | None = None
        async for tokens, reason in self._outputs(seq, queue):
            piece = stops.push(self.tokenizer.decode(tokens))
            if stops.stopped:
                finish = "stop"
            elif reason is not None:
                piece += stops.flush(self.tokenizer.decode(tokens))
                finish = reason
            if piece:
                await resp.write(writer.chunk(piece, None))
            if finish is not None:
                break
        await resp.write(writer.chunk("", finish or "length"))
        if req.include_usage:
            await resp.write(
                writer.usage_chunk(usage(len(seq.prompt), len(seq.output), seq.cached_len))
            )
        await resp.write(SSE_DONE)
        self._observe(seq)
        await resp.write_eof()
        return resp

    async def _outputs(self, seq: Sequence, queue: asyncio.Queue[Output]) -> Any:
        """Yield (all output tokens so far, finish reason or None) per event."""
        while True:
            out = await queue.get()
            if out.error is not None:
                yield list(seq.output), "error"
                return
            yield list(seq.output), out.finish_reason
            if out.finish_reason is not None:
                return

    def _observe(self, seq: Sequence) -> None:
        now = time.perf_counter()
        self.metrics.requests.labels("ok").inc()
        if seq.first_token_at is not None:
            self.metrics.ttft.observe(seq.first_token_at - seq.arrival)
            if len(seq.output) > 1:
                self.metrics.tpot.observe((now - seq.first_token_at) / (len(seq.output) - 1))


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(error_body(message, kind), status=status)


def parse_pull(value: str | None) -> PullHint | None:
    """``node=<peer>;agent=<url>;blocks=<n>``; a malformed hint is a 400."""
    if not value:
        return None
    try:
        return parse_pull_hint(value)
    except PullHintError as exc:
        raise RequestError(f"malformed {PULL_HEADER} header: {exc}", PULL_HEADER) from None
