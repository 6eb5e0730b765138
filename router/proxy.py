"""The request path of the OpenAI endpoints: a client's request read and checked,
admitted, routed to a pod, and tried on up to ``MAX_ATTEMPTS`` pods in the decision's
order until one answers (``forward`` makes each attempt). Every request is counted by
kind and status; a request no pod took is an OpenAI-style 503 with ``Retry-After``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from kvmarina.headers import PULL_HEADER, SALT_HEADER, PullHint
from kvmarina.router.admission import Admission, Rejected
from kvmarina.router.config import RouterConfig
from kvmarina.router.forward import Forwarder, Moved, UpstreamFailed
from kvmarina.router.headers import STRIPPED_HEADERS, raw_value
from kvmarina.router.metrics import RouterMetrics
from kvmarina.router.reply import Reply, error_body, send_json
from kvmarina.router.requests import BadRequest, ParsedRequest, parse_body, parse_request
from kvmarina.router.routing import NoPodAvailable, RoutingCore
from kvmarina.router.tenancy import derive_salt
from kvmarina.router.vllm_request import vllm_request, with_pull
from kvmarina.tokenizer import Tokenizer

log = logging.getLogger("kvmarina.router")
#: the best pod and two more: enough to ride out one node's failure, few enough that a
#: request nobody can serve is answered quickly
MAX_ATTEMPTS = 3


def forwarded_headers(received: Mapping[str, str], salt: str) -> dict[str, str]:
    """The client's headers an engine may see, plus the tenancy salt the router set."""
    headers = {k: raw_value(v) for k, v in received.items() if k.lower() not in STRIPPED_HEADERS}
    headers[SALT_HEADER] = salt
    return headers


class Proxy:
    """The OpenAI endpoints' handler. ``apply`` takes a reloaded config and tokenizer."""

    def __init__(
        self,
        cfg: RouterConfig,
        tokenizer: Tokenizer,
        core: RoutingCore,
        admission: Admission,
        metrics: RouterMetrics,
        forwarder: Forwarder,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.core = core
        self.admission = admission
        self.metrics = metrics
        self.forwarder = forwarder
        self._answered_children: dict[tuple[str, int], Any] = {}

    def apply(self, cfg: RouterConfig, tok: Tokenizer | None = None) -> None:
        self.cfg = cfg
        if tok is not None:
            self.tokenizer = tok
        self.forwarder.timeout_s = cfg.limits.request_timeout_s

    async def handle(
        self, headers: Mapping[str, str], raw: bytes, reply: Reply, kind: str, path: str
    ) -> None:
        """A request (a ``kind`` of ``completions`` or ``chat``, its ``headers`` a
        case-insensitive map, its body ``raw``) proxied to ``path``, answered on ``reply``."""
        try:
            parsed = parse_request(parse_body(raw), kind, self.cfg.model, self.tokenizer)
        except BadRequest as exc:
            await self.reject(reply, kind, exc)
            return
        salt = derive_salt(self.cfg.sharing, self.cfg.namespace, self.cfg.serving, headers)
        try:
            await self.admission.acquire()
        except Rejected as exc:
            self.metrics.rejected.inc()
            await self._error(
                reply,
                kind,
                429,
                f"the router is at capacity ({exc}); retry later",
                "rate_limit_error",
            )
            return
        try:
            await self._route(headers, reply, kind, path, raw, parsed, salt)
        finally:
            self.admission.release()

    async def reject(self, reply: Reply, kind: str, exc: BadRequest) -> None:
        """A client error, answered as OpenAI does."""
        self._answered(kind, exc.status).inc()
        await send_json(reply, exc.status, exc.body())

    async def _route(
        self,
        received: Mapping[str, str],
        reply: Reply,
        kind: str,
        path: str,
        raw: bytes,
        parsed: ParsedRequest,
        salt: str,
    ) -> None:
        t0 = time.perf_counter()
        try:
            decision = self.core.decide(parsed.tokens, salt, received)
        except NoPodAvailable as exc:
            await self._error(reply, kind, 503, str(exc))
            return
        self.metrics.decision.observe(time.perf_counter() - t0)
        headers = forwarded_headers(received, salt)
        vllm_body = vllm_request(parsed.body, salt) if self.cfg.engine == "vllm" else None
        if vllm_body is not None:
            raw = json.dumps(vllm_body).encode()
        last_error = "no pod could be tried"
        for attempt, pod in enumerate(decision.first(MAX_ATTEMPTS)):
            if attempt and not pod.available():
                continue  # the decision's runners-up may have failed since it was made
            body = self._with_pull(decision.pull if attempt == 0 else None, raw, vllm_body, headers)
            try:
                status = await self.forwarder.forward(
                    reply, pod, path, body, headers, parsed, decision, may_move=attempt == 0
                )
            except Moved as exc:
                log.debug("request moved off %s: %s", pod.name, exc)
                self.metrics.moves.inc()
                continue
            except UpstreamFailed as exc:
                last_error = f"pod {pod.name}: {exc}"
                log.warning("attempt %d failed on %s: %s", attempt + 1, pod.name, exc)
                self.metrics.retries.inc()
                continue
            self._answered(kind, status).inc()
            return
        await self._error(reply, kind, 503, f"no pod answered: {last_error}")

    def _with_pull(
        self,
        hint: PullHint | None,
        raw: bytes,
        vllm_body: dict[str, Any] | None,
        headers: dict[str, str],
    ) -> bytes:
        """The body for one attempt; ``headers`` carry ``hint`` or, on a retry, drop it
        (a pull hint names blocks for the decision's best pod only)."""
        if hint is None:
            headers.pop(PULL_HEADER, None)
            return raw
        headers[PULL_HEADER] = hint.format()
        self.metrics.pull_hints.inc()
        if vllm_body is None:
            return raw
        # vLLM hands kv_transfer_params to the connector
        return json.dumps(with_pull(vllm_body, hint)).encode()

    async def _error(
        self, reply: Reply, kind: str, status: int, message: str, error: str | None = None
    ) -> None:
        """An error the router itself answers; a client may retry after ``Retry-After``."""
        self._answered(kind, status).inc()
        retry = {"Retry-After": str(self.cfg.limits.retry_after_s)}
        body = error_body(message, error or "service_unavailable")
        await reply.whole(status, "application/json", body, retry)

    def _answered(self, kind: str, status: int) -> Any:
        """The requests counter of ``kind`` and ``status`` (label lookups cost more than
        the increment, so the children are kept)."""
        child = self._answered_children.get((kind, status))
        if child is None:
            child = self.metrics.requests.labels(kind, str(status))
            self._answered_children[kind, status] = child
        return child
