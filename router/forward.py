"""One attempt of a request on one pod: send it, relay the answer (whole or streamed) to
the client, and keep the books the routing decisions read: the pod's queue, in-flight
and decoding counts, its breaker, TTFTs, the engine's load reports and the record of
where the prompt's blocks went.

An attempt that fails before the client saw a byte raises ``UpstreamFailed`` (the
request path may try the next pod); one that fails later ends the client's stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from kvmarina.load_report import AHEAD_HEADER, LOAD_HEADER, EngineLoad, parse_load_header
from kvmarina.router.deadlines import Deadlines
from kvmarina.router.decision import Decision
from kvmarina.router.metrics import RouterMetrics
from kvmarina.router.pods import PodState
from kvmarina.router.reply import Reply
from kvmarina.router.requests import ParsedRequest
from kvmarina.router.routing import RoutingCore
from kvmarina.router.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from kvmarina.router.vllm_follower import VLLMFollower

log = logging.getLogger("kvmarina.router")
#: answers that mean "not this pod, not now": nothing was processed, another pod may be
RETRY_STATUSES = frozenset({502, 503, 504})


class UpstreamFailed(Exception):
    """The pod failed before sending a first byte: the next pod may be tried."""


class Moved(Exception):
    """The pod had more prefill ahead of the request than the decision saw (another
    router's, sent just before) and the runner-up is now the better pod: the request
    was taken back before its prefill began, for the next pod."""


class Attempt:
    """One attempt's share of its pod's load figures, from sending to the last byte.

    Invariant: what ``__init__`` added to the pod, ``settle`` takes back exactly once,
    however the attempt ends (the prompt's tokens leave the queue at the first byte at
    the latest; a request past its first byte counts as decoding until it ends)."""

    __slots__ = (
        "decoding",
        "looked_up",
        "occupancy",
        "pending",
        "pod",
        "prefill_s",
        "pulling",
        "queue_s",
        "t0",
        "uncached",
    )

    def __init__(
        self,
        pod: PodState,
        uncached: int,
        core: RoutingCore,
        pulling: int = 0,
        looked_up: bool = True,
    ) -> None:
        now = time.monotonic()
        self.pod = pod
        self.uncached = uncached
        # ``uncached`` came from a prefix lookup; a policy that looked nothing up takes
        # the whole prompt for uncached, which must teach neither the prefill rate nor
        # the usual request (after a round-robin spell on the vLLM fleet: 28k tokens/s
        # against 8k real, 2,000-token requests against ~300)
        self.looked_up = looked_up
        self.pulling = pulling  # blocks the pod pulls from a peer first (a hinted pull)
        # what the TTFT model is fed with is the pod's state as this request joined it
        self.occupancy = pod.occupancy(now)
        slowdown = pod.slowdown(now)
        self.queue_s = core.queued(pod, now) * slowdown / pod.prefill_tps
        self.prefill_s = uncached * slowdown / pod.prefill_tps
        pod.breaker.on_attempt()
        pod.inflight += 1
        pod.queue_add(uncached, now)
        if looked_up:
            pod.note_sent(uncached)
        self.pending = uncached  # tokens of ours still in the pod's queue
        self.decoding = False
        self.t0 = time.perf_counter()

    def withdraw(self) -> None:
        """Taken back before the engine began it: its tokens leave the queue undone."""
        self.pod.queued_tokens -= self.pending
        self.pending = 0

    def prefilled(self) -> None:
        self.pod.queue_done(self.pending)
        self.pending = 0

    def settle(self) -> None:
        pod = self.pod
        pod.inflight -= 1
        pod.queue_done(self.pending)
        if self.decoding:
            pod.decoding -= 1


class Forwarder:
    """Sends attempts to pods over ``upstream`` and keeps the books on each.

    ``vllm`` is the router's own map of pod name to KV-event follower (shared, so that
    followers started later are seen); ``timeout_s`` bounds an attempt end to end."""

    def __init__(
        self,
        core: RoutingCore,
        metrics: RouterMetrics,
        vllm: Mapping[str, VLLMFollower],
        upstream: UpstreamPool,
        timeout_s: float,
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.vllm = vllm
        self.upstream = upstream
        self.timeout_s = timeout_s
        self.deadlines = Deadlines()  # each attempt's ``timeout_s``
        self._routed_children: dict[str, Any] = {}
        self._load_reports: dict[str, EngineLoad | None] = {}

    async def forward(
        self,
        reply: Reply,
        pod: PodState,
        path: str,
        body: bytes,
        headers: dict[str, str],
        parsed: ParsedRequest,
        decision: Decision,
        may_move: bool = False,
    ) -> int:
        """The pod's answer relayed on ``reply``, its status returned; ``UpstreamFailed``
        if the client got nothing yet; ``Moved`` (only when ``may_move``) if the engine's
        early head showed a herd the runner-up avoids."""
        n_tokens = len(parsed.tokens)
        uncached = decision.uncached_tokens(pod, n_tokens, self.core.contract.block_size)
        a = Attempt(pod, uncached, self.core, decision.pulling, decision.looked_up)
        status = 0
        self.deadlines.add(a, self.timeout_s)
        try:
            up = await self._send(a, path, body, headers, decision)
            status = up.status
            try:
                if up.status in RETRY_STATUSES:
                    self._failed(pod)
                    raise UpstreamFailed(f"HTTP {up.status}")
                reported = self._load_report(up.headers.get(LOAD_HEADER))
                ahead = up.headers.get(AHEAD_HEADER)
                if ahead is not None:
                    # the head came as the engine took the request, before its prefill
                    if reported is not None:
                        pod.note_engine(reported, time.monotonic())
                        reported = None
                    if may_move and self._herded(a, decision, ahead):
                        a.withdraw()
                        raise Moved(f"{ahead} prompt tokens were ahead on {pod.name}")
                # else the engine's load is as it answers: this request's prefill is done
                self._sent(pod, decision, n_tokens, uncached)
                if not parsed.stream:
                    await self._relay_whole(reply, a, up, reported)
                    return up.status
                if not await self._relay_stream(reply, a, up, reported):
                    return up.status  # the client sees a truncated stream
            finally:
                up.release()
            await self._end_stream(reply, a, up)
            return up.status
        except asyncio.CancelledError:
            if not self.deadlines.expired(a):
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # the attempt's own limit, not a cancellation from outside
            self._failed(pod)
            if not reply.started:
                raise UpstreamFailed("timed out") from None
            reply.abort()  # past the head: the client sees a cut body
            return status
        finally:
            self.deadlines.discard(a)
            a.settle()

    def _herded(self, a: Attempt, decision: Decision, ahead: str) -> bool:
        """Whether to take the request back: the engine reported ``ahead`` prompt
        tokens queued before it, and with them counted the decision's runner-up wins."""
        try:
            tokens = int(ahead)
        except ValueError:
            return False  # an unreadable report only refines routing: stay
        pod = a.pod
        extra = tokens * pod.slowdown(time.monotonic()) / pod.prefill_tps - a.queue_s
        if not self.core.worth_moving(decision, pod, extra):
            return False
        self.core.not_computing(pod, decision)
        return True

    async def _send(
        self, a: Attempt, path: str, body: bytes, headers: dict[str, str], decision: Decision
    ) -> UpstreamResponse:
        try:
            # the rest of the prompt's hashes (routing needed only its cached prefix)
            # are for ``record_sent``: computed while the pod works
            return await self.upstream.post(a.pod.cfg.url, path, body, headers, decision.chain.all)
        except UpstreamError as exc:
            self._failed(a.pod)
            raise UpstreamFailed(str(exc)) from exc

    async def _relay_whole(
        self, reply: Reply, a: Attempt, up: UpstreamResponse, reported: EngineLoad | None
    ) -> None:
        try:
            body = await up.read()
        except UpstreamError as exc:
            self._failed(a.pod)
            raise UpstreamFailed(f"failed before the first byte: {exc}") from exc
        self._first_byte(a, reported, decoding=False)
        a.pod.breaker.on_success()
        await reply.whole(up.status, up.content_type, body)

    async def _relay_stream(
        self, reply: Reply, a: Attempt, up: UpstreamResponse, reported: EngineLoad | None
    ) -> bool:
        """Copy the pod's chunks to the client; ``False`` if the pod failed mid-stream.

        A chunked answer is copied as it came, framing and all (``iter_framed``), where
        the reply takes it so: a streamed completion is a chunk a token, and taking
        each apart and framing it again was most of a relaying router's CPU."""
        framed = up.chunked and reply.takes_framed
        write = reply.write
        try:
            async for chunk in up.iter_framed() if framed else up.iter_chunks():
                if not reply.started:
                    self._first_byte(a, reported, decoding=True)
                    await self._start(reply, up, framed)
                await write(chunk)
        except UpstreamError as exc:
            self._failed(a.pod)
            if not reply.started:
                raise UpstreamFailed(f"failed before the first byte: {exc}") from exc
            log.warning("pod %s failed mid-stream: %s", a.pod.name, exc)
            reply.abort()  # the client sees a cut body, not a complete one
            return False
        return True

    async def _start(self, reply: Reply, up: UpstreamResponse, framed: bool) -> None:
        """The client's answer begun: from here on no other pod can be tried."""
        cache = up.headers.get("cache-control")
        headers = {"Cache-Control": cache} if cache is not None else None
        await reply.start(up.status, up.content_type, headers, framed=framed)

    async def _end_stream(self, reply: Reply, a: Attempt, up: UpstreamResponse) -> None:
        if not reply.started:  # the pod's stream ended without a chunk
            await self._start(reply, up, False)
        a.pod.breaker.on_success()
        await reply.end()

    def _first_byte(self, a: Attempt, reported: EngineLoad | None, *, decoding: bool) -> None:
        """TTFT observed, the prompt out of the pod's queue, the engine's report noted;
        ``decoding``: a stream, which decodes on the pod until its last byte."""
        pod = a.pod
        ttft = time.perf_counter() - a.t0
        self.metrics.ttft.observe(ttft)
        if a.pulling:
            self.core.observe_pull(pod, a.pulling, ttft - a.queue_s - a.prefill_s)
        elif a.looked_up:
            self.core.observe_ttft(pod, a.uncached, ttft, a.queue_s, a.occupancy)
        a.prefilled()
        if decoding:
            # counted before the engine's report, which reads ``pod.prefilling``
            pod.decoding += 1
            a.decoding = True
        if reported is not None:
            pod.note_engine(reported, time.monotonic())

    def _failed(self, pod: PodState) -> None:
        pod.breaker.on_failure()
        pod.failed += 1

    def _sent(self, pod: PodState, decision: Decision, n_tokens: int, uncached: int) -> None:
        """The pod took the request: count it and record where its blocks will be."""
        pod.served += 1
        self._routed(pod.name).inc()
        follower = self.vllm.get(pod.name)
        if follower is not None and len(decision.hashes) > decision.cached_blocks.get(
            pod.domain, 0
        ):
            follower.expect()  # new full blocks: their BlockStored events are due
        matched = max(decision.cached_blocks.values(), default=0)
        self.core.record_sent(pod.domain, decision.hashes, matched, pod.name, decision.computing_at)
        self.metrics.prompt_tokens.inc(n_tokens)
        self.metrics.cached_tokens.inc(n_tokens - uncached)

    def _routed(self, pod: str) -> Any:
        """The routed counter of ``pod`` (label lookups cost more than the increment)."""
        child = self._routed_children.get(pod)
        if child is None:
            child = self._routed_children[pod] = self.metrics.routed.labels(pod)
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
