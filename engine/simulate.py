"""``kvmarina engine --simulate``: the engine's OpenAI API with a timing model, no model.

For router work and capacity planning. Each simulated pod

* tokenizes and hashes exactly like the engine (``kvmarina.tokenizer``,
  ``kvmarina.prompts.prompt_tokens``, ``HashContract.block_hashes`` with the salt from
  ``x-kvmarina-salt``);
* keeps a KV cache of ``kv_blocks`` blocks in LRU order: a prompt's leading
  blocks found there are free (``usage.prompt_tokens_details.cached_tokens``);
* prefills one request at a time at ``prefill_tps`` tokens/s (so queueing shows
  up in TTFT), then decodes at ``decode_tps`` tokens/s per request, batched: a
  sequence decoding does not hold up another's decode, but every prefill step runs
  ``decode_interference`` slower per sequence decoding beside it (a batched decode
  step shares the engine's step with the prefill chunk); a rate of 0 means "at
  once" (for proxy benchmarks);
* honours ``x-kvmarina-pull`` (``node=..;agent=..;blocks=N``): blocks beyond its
  own run up to ``N`` cost ``block_bytes / pull_bytes_per_s`` instead of prefill;
* acts as its node's agent: ``GET /v1/events`` streams the same frames a real
  agent does (``kvmarina.framing`` + ``kvmarina.events``: a ``Snapshot``, then
  ``stored``/``evicted`` events with consecutive ``seq``; a subscriber that falls
  behind gets a ``Resync`` and a fresh snapshot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kvmarina.event_log import EventLog, stream
from kvmarina.events import LoadRecord
from kvmarina.hashing import HashContract
from kvmarina.headers import PULL_HEADER, SALT_HEADER, PullHintError, parse_pull_hint
from kvmarina.load_report import AHEAD_HEADER, LOAD_HEADER, EngineLoad, format_load
from kvmarina.prompts import PromptError, prompt_tokens
from kvmarina.tokenizer import Tokenizer, load_tokenizer

SUBSCRIBER_QUEUE = 4096
DEFAULT_IDENTITY = "sim@v1|simulated|tp0of1"
OUTPUT_TEXT = "the quick brown fox jumps over the lazy dog "
DECODE_TICK_S = 0.05


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated pod. Rates of 0 mean infinitely fast."""

    model: str = "sim"
    model_identity: str = DEFAULT_IDENTITY
    node: str = "sim-node"
    kv_blocks: int = 4096
    prefill_tps: float = 20000.0
    decode_tps: float = 100.0
    decode_interference: float = 0.01  # prefill slows this much per decoding sequence
    block_size: int = 16
    hash_algorithm: str = "blake2b"
    digest_bits: int = 128
    block_bytes: int = 131072
    pull_bytes_per_s: float = 2.0e9
    tokenizer_dir: str | None = None
    default_salt: str = ""  # a request without the router's salt header: the scope's


class SimKV:
    """An LRU set of block hashes. Invariant: ``len(blocks) <= capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[bytes, None] = OrderedDict()

    def run(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            n += 1
        return n

    def peek(self, hashes: Sequence[bytes]) -> int:
        """``run`` without refreshing the LRU order."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Store ``hashes`` (most recent last); returns (newly stored, evicted)."""
        stored: list[bytes] = []
        for h in hashes[-self.capacity :] if self.capacity else ():
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
                stored.append(h)
        evicted: list[bytes] = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        # a block stored and evicted in the same call was never visible
        gone = set(evicted)
        return [h for h in stored if h not in gone], [h for h in evicted if h not in stored]


@dataclass(slots=True)
class SimStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    pulled_tokens: int = 0
    rejected: int = 0
    ttft: list[float] = field(default_factory=list)


class SimEngine:
    """One simulated pod's HTTP app."""

    def __init__(self, cfg: SimConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self.contract = HashContract(cfg.block_size, cfg.hash_algorithm, cfg.digest_bits // 8)
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_dir)
        self.kv = SimKV(cfg.kv_blocks)
        self.hub = EventLog(
            cfg.node, lambda: dict.fromkeys(self.kv.blocks, "device"), max_queue=SUBSCRIBER_QUEUE
        )
        self.stats = SimStats()
        self._prefill = asyncio.Lock()
        self.decoding = 0  # sequences past their first token, not yet finished
        self.waiting = 0  # requests queued for the prefill server
        self.prefilling = False
        self.queued_tokens = 0  # prompt tokens still to prefill (cache hits excluded)
        self._push_due: asyncio.Handle | None = None  # the load push of this loop turn
        self._prefill_now: tuple[float, float, int] | None = None  # prefill: start, length, tokens

    def runner(self) -> web.AppRunner:
        """The app's runner. A request whose client went away is cancelled, as vLLM
        aborts one whose connection closed: one still waiting leaves the queue (and
        the load figures) at once, and one prefilling frees the prefill server."""
        return web.AppRunner(self.app(), access_log=None, handler_cancellation=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/events", self._events)
        app.on_shutdown.append(self._end_streams)
        return app

    async def _end_streams(self, app: web.Application) -> None:
        """Event streams never end by themselves: close them so shutdown does not wait."""
        self.hub.close()

    # -- plain endpoints --------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "kvmarina"}
                ],
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "simulated": True, "node": self.cfg.node})

    async def _metrics(self, request: web.Request) -> web.Response:
        s = self.stats
        lines = [
            f"kvmarina_sim_requests_total {s.requests}",
            f"kvmarina_sim_prompt_tokens_total {s.prompt_tokens}",
            f"kvmarina_sim_cached_tokens_total {s.cached_tokens}",
            f"kvmarina_sim_pulled_tokens_total {s.pulled_tokens}",
            f"kvmarina_sim_kv_blocks {len(self.kv.blocks)}",
            f"kvmarina_sim_kv_capacity_blocks {self.kv.capacity}",
            f"kvmarina_sim_event_seq {self.hub.seq}",
            f"kvmarina_sim_requests_running {self.decoding}",
            f"kvmarina_sim_requests_waiting {self.waiting}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-kvmarina-frames"})
        await resp.prepare(request)
        await stream(self.hub, resp.write)
        return resp

    # -- generation ---------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    def _parse(self, raw: bytes, kind: str) -> tuple[dict[str, Any], list[int]]:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        if body.get("model") != self.cfg.model:
            raise _BadRequest(f"model {body.get('model')!r} is not served here", 404)
        try:
            return body, prompt_tokens(body, kind, self.tokenizer)
        except PromptError as exc:
            raise _BadRequest(str(exc)) from None

    def _pull_blocks(self, value: str | None) -> int:
        """Blocks a pull hint offers; an unreadable hint is none (a real engine says
        400: the simulator models timing, not validation)."""
        try:
            return parse_pull_hint(value).blocks if value else 0
        except PullHintError:
            return 0

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body, tokens = self._parse(await request.read(), kind)
            max_tokens = int(body.get("max_tokens", body.get("max_completion_tokens", 16)))
        except (_BadRequest, ValueError, TypeError) as exc:
            status = exc.status if isinstance(exc, _BadRequest) else 400
            self.stats.rejected += 1
            return web.json_response(
                {
                    "error": {
                        "message": str(exc),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=status,
            )
        t0 = time.perf_counter()
        salt = request.headers.get(SALT_HEADER, self.cfg.default_salt)
        hashes = self.contract.block_hashes(tokens, self.cfg.model_identity, salt)
        stream = bool(body.get("stream"))
        # the prefill work ahead of this request, for a stream's early head
        before = (self.load().queued_tokens or 0) if stream else 0
        self.waiting += 1
        own = len(tokens) - self.kv.peek(hashes) * self.cfg.block_size
        self.queued_tokens += own
        self._push_load()
        started = False
        try:
            # a stream's head goes out as the engine takes the request, saying what is
            # ahead of it: a router that finds another replica's prompt there may
            # close it while it waits (its connection gone, the request leaves the
            # queue: ``runner``) and send it elsewhere
            resp = await self._head(request, before) if stream else None
            async with self._prefill:
                self.waiting -= 1
                started = self.prefilling = True
                _, cached, pulled = await self._prefill_one(request, tokens, hashes)
        finally:
            self.queued_tokens -= own
            self.prefilling = False
            if not started:
                self.waiting -= 1
            self._push_load()
        self.stats.requests += 1
        self.stats.prompt_tokens += len(tokens)
        self.stats.cached_tokens += cached
        self.stats.pulled_tokens += pulled * self.cfg.block_size
        self.stats.ttft.append(time.perf_counter() - t0)
        usage = {
            "prompt_tokens": len(tokens),
            "completion_tokens": max_tokens,
            "total_tokens": len(tokens) + max_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if resp is not None:
            opts = body.get("stream_options") or {}
            return await self._stream(
                resp,
                kind,
                max_tokens,
                usage,
                bool(isinstance(opts, dict) and opts.get("include_usage")),
            )
        text = await self._decode(max_tokens, None)
        doc = self._completion_doc(kind, text, usage)
        return web.json_response(doc, headers=self._load_header())

    def _load_header(self) -> dict[str, str]:
        """The engine's load, sent with every answer (``kvmarina.load_report``)."""
        return {LOAD_HEADER: format_load(self.load())}

    def load(self) -> EngineLoad:
        """Sequences running and waiting, and the prompt tokens still to prefill: the
        part of the prefill now running that is done is not (a router that counted it
        saw more work queued here than there was)."""
        queued = self.queued_tokens
        if self._prefill_now is not None:
            start, length, tokens = self._prefill_now
            queued -= int(tokens * min(1.0, (time.monotonic() - start) / length))
        return EngineLoad(self.decoding + int(self.prefilling), self.waiting, max(0, queued))

    def _push_load(self) -> None:
        """The same figures on the node's event stream, as they change (the simulated
        pod is its node's agent and only engine, so it names no pod), once per turn of
        the event loop: a request that queues, prefills and ends in one turn is one
        push, not three (which cost the router following 1,000 requests/s a tenth of
        its CPU). Never later than that: router replicas deciding during a burst need
        it (two replicas, decode replay: p90 1.09x and 1.13x one replica's when pushes
        waited up to 5 ms, 1.06-1.12x at once, 1.30-1.50x with no pushes)."""
        if self.hub.subscribers and self._push_due is None:
            self._push_due = asyncio.get_running_loop().call_soon(self._flush_load)

    def _flush_load(self) -> None:
        self._push_due = None
        self.hub.publish_load(LoadRecord.of("", self.load()))

    async def _prefill_one(
        self, request: web.Request, tokens: list[int], hashes: list[bytes]
    ) -> tuple[int, int, int]:
        """One prefill on the engine's prefill server: (cached blocks, cached tokens,
        pulled blocks).

        The prompt's blocks are stored, and announced, as the prefill starts, as vLLM's
        scheduler does (``KVCacheManager.allocate_slots`` caches a chunk's full blocks
        when it schedules the chunk, and the step's ``BlockStored`` events go out with
        it): every router following the node sees at once where the prompt is being
        computed, its replicas too, not only the one that sent it. The server is one
        at a time, so a request behind this one finds the blocks computed."""
        run = self.kv.run(hashes)
        pulled = max(0, min(self._pull_blocks(request.headers.get(PULL_HEADER)), len(hashes)) - run)
        cached = run * self.cfg.block_size
        compute = len(tokens) - cached - pulled * self.cfg.block_size
        delay = 0.0
        if self.cfg.prefill_tps > 0:
            slower = 1.0 + self.cfg.decode_interference * self.decoding
            delay += compute / self.cfg.prefill_tps * slower
        if pulled and self.cfg.pull_bytes_per_s > 0:
            delay += pulled * self.cfg.block_bytes / self.cfg.pull_bytes_per_s
        stored, evicted = self.kv.insert(hashes)
        self.hub.publish("stored", stored, "device")
        self.hub.publish("evicted", evicted)
        if delay > 0:
            self._prefill_now = (time.monotonic(), delay, compute)
            try:
                await asyncio.sleep(delay)
            finally:
                self._prefill_now = None
        return run, cached, pulled

    async def _decode(self, n: int, step: Any) -> str:
        """The first token comes with the prefill; the rest at ``decode_tps``, written
        in bursts at most every ``DECODE_TICK_S`` (hundreds of sequences decode at once
        in a replay: a timer per token would measure the event loop, not routing)."""
        out = []
        delay = 1.0 / self.cfg.decode_tps if self.cfg.decode_tps > 0 else 0.0
        self.decoding += 1
        try:
            start, due = time.monotonic(), 0.0
            for i in range(n):
                piece = OUTPUT_TEXT[i % len(OUTPUT_TEXT)]
                out.append(piece)
                if step is not None:
                    await step(piece)
                if delay and i + 1 < n:
                    due += delay
                    ahead = start + due - time.monotonic()
                    if ahead >= DECODE_TICK_S or i + 2 == n:
                        await asyncio.sleep(max(0.0, ahead))
        finally:
            self.decoding -= 1
            self._push_load()
        return "".join(out)

    def _completion_doc(self, kind: str, text: str, usage: dict[str, Any]) -> dict[str, Any]:
        base = {
            "id": f"sim-{uuid.uuid4().hex[:12]}",
            "created": int(time.time()),
            "model": self.cfg.model,
            "usage": usage,
        }
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            return {**base, "object": "chat.completion", "choices": [choice]}
        return {
            **base,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
        }

    async def _head(self, request: web.Request, ahead: int) -> web.StreamResponse:
        """A stream's head, sent as the request is taken: the engine's load then, and
        the prompt tokens still to prefill ahead of it (``AHEAD_HEADER``)."""
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **self._load_header(),
                AHEAD_HEADER: str(ahead),
            }
        )
        await resp.prepare(request)
        return resp

    async def _stream(
        self,
        resp: web.StreamResponse,
        kind: str,
        n: int,
        usage: dict[str, Any],
        include_usage: bool,
    ) -> web.StreamResponse:
        rid = f"sim-{uuid.uuid4().hex[:12]}"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(piece: str | None, finish: str | None) -> dict[str, Any]:
            if kind == "chat":
                delta = {} if piece is None else {"content": piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": piece or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            return {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": self.cfg.model,
                "choices": [choice],
            }

        async def send(doc: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(doc).encode() + b"\n\n")

        if kind == "chat":
            first = chunk(None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await send(first)

        async def step(piece: str) -> None:
            await send(chunk(piece, None))

        await self._decode(n, step)
        await send(chunk(None, "length"))
        if include_usage:
            await send(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": self.cfg.model,
                    "choices": [],
                    "usage": usage,
                }
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _env(name: str, default: str) -> str:
    """The operator configures a simulated engine pod as it does the reference engine,
    with ``KVMARINA_ENGINE_*`` variables (flags win)."""
    return os.environ.get(f"KVMARINA_ENGINE_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvmarina engine --simulate", description="Serve the engine API with a timing model."
    )
    ap.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    ap.add_argument(
        "--port", type=int, default=int(_env("PORT", "8000")), help="first port; 0 picks free ones"
    )
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="pods in this process, each its own node (<node>-<i>) and port",
    )
    ap.add_argument("--model", default=_env("MODEL", "sim"))
    ap.add_argument(
        "--model-identity",
        default=_env("MODEL_IDENTITY", DEFAULT_IDENTITY),
        help="seeds block hashes like the router's model_identity; auto: the model folder's",
    )
    ap.add_argument("--revision", default=_env("REVISION", "main"))
    ap.add_argument("--dtype", default=_env("DTYPE", "float32"))
    ap.add_argument("--node", default=_env("NODE", "sim-node"))
    ap.add_argument("--kv-blocks", type=int, default=4096, help="KV capacity in blocks")
    ap.add_argument("--prefill-tps", type=float, default=20000.0, help="0 = instant")
    ap.add_argument("--decode-tps", type=float, default=100.0, help="0 = instant")
    ap.add_argument(
        "--decode-interference",
        type=float,
        default=0.01,
        help="prefill slowdown per sequence decoding beside it (0.01 = 1%%)",
    )
    ap.add_argument("--block-size", type=int, default=int(_env("BLOCK_SIZE", "16")))
    ap.add_argument("--hash-algorithm", default=_env("HASH_ALGORITHM", "blake2b"))
    ap.add_argument("--digest-bits", type=int, default=int(_env("DIGEST_BITS", "128")))
    ap.add_argument("--block-bytes", type=int, default=131072)
    ap.add_argument("--pull-bytes-per-s", type=float, default=2.0e9)
    ap.add_argument("--tokenizer-dir", default=_env("MODEL_DIR", "") or None)
    ap.add_argument("--default-salt", default=_env("DEFAULT_SALT", ""))
    return ap


def _identity(args: argparse.Namespace) -> str:
    """``auto``: the model folder's identity, by the function router and engine use."""
    if args.model_identity != "auto":
        return str(args.model_identity)
    if not args.tokenizer_dir:
        raise SystemExit(
            "kvmarina engine --simulate: --model-identity auto needs the model folder "
            "(--tokenizer-dir or KVMARINA_ENGINE_MODEL_DIR)"
        )
    from kvmarina.layout import LayoutError, folder_identity

    try:
        return folder_identity(
            args.tokenizer_dir, args.model, args.revision, args.dtype, args.block_size
        ).canonical()
    except LayoutError as exc:
        raise SystemExit(f"kvmarina engine --simulate: {exc}") from None


async def serve(cfgs: list[SimConfig], host: str, port: int) -> None:
    runners, urls = [], []
    for i, cfg in enumerate(cfgs):
        runner = SimEngine(cfg).runner()
        await runner.setup()
        site = web.TCPSite(runner, host, port + i if port else 0, backlog=2048)
        await site.start()
        runners.append(runner)
        urls.append(f"http://{host}:{runner.addresses[0][1]}")
    print(json.dumps({"simulated_engines": urls, "nodes": [c.node for c in cfgs]}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for r in runners:
            await r.cleanup()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas < 1 or args.kv_blocks < 0:
        print(
            "kvmarina engine --simulate: --replicas must be >= 1 and --kv-blocks >= 0",
            file=sys.stderr,
        )
        return 2
    identity = _identity(args)
    cfgs = [
        SimConfig(
            model=args.model,
            model_identity=identity,
            node=args.node if args.replicas == 1 else f"{args.node}-{i}",
            kv_blocks=args.kv_blocks,
            prefill_tps=args.prefill_tps,
            decode_tps=args.decode_tps,
            decode_interference=args.decode_interference,
            block_size=args.block_size,
            hash_algorithm=args.hash_algorithm,
            digest_bits=args.digest_bits,
            block_bytes=args.block_bytes,
            pull_bytes_per_s=args.pull_bytes_per_s,
            tokenizer_dir=args.tokenizer_dir,
            default_salt=args.default_salt,
        )
        for i in range(args.replicas)
    ]
    try:
        asyncio.run(serve(cfgs, args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0
