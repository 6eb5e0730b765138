"""Per-pod state the router keeps: health, circuit breaker, load, learned prefill rate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvmarina.router.config import PodConfig


@dataclass(slots=True)
class Breaker:
    """Circuit breaker: ``failures`` consecutive failures open it for ``cooldown_s``;
    then one trial request is let through (half-open); a success closes it.

    Invariant: ``state`` is one of closed/open/half-open; ``opened_at`` is set when open.
    """

    threshold: int = 3
    cooldown_s: float = 5.0
    failures: int = 0
    state: str = "closed"
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float | None = None) -> bool:
        if self.state == "closed":
            return True
        now = time.monotonic() if now is None else now
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state = "half-open"
            self.trial_in_flight = False
        return self.state == "half-open" and not self.trial_in_flight

    def on_attempt(self) -> None:
        if self.state == "half-open":
            self.trial_in_flight = True

    def on_success(self) -> None:
        self.failures, self.state, self.trial_in_flight = 0, "closed", False

    def on_failure(self, now: float | None = None) -> None:
        self.failures += 1
        self.trial_in_flight = False
        if self.state == "half-open" or self.failures >= self.threshold:
            self.state = "open"
            self.opened_at = time.monotonic() if now is None else now


@dataclass(slots=True)
class PodState:
    """One pod as the router sees it. ``inflight``/``queued_tokens`` count requests
    sent and not yet answered (tokens: their uncached prefill); ``queue_ahead`` is the
    part of that prefill not done yet, as an engine working since ``busy_since`` at
    ``prefill_tps`` would have left it.

    ``domain`` names where the pod's KV cache lives in the router's indexes: its node
    (every engine of a node shares the node agent's pool), or ``pod/<name>`` for an
    engine with a KV cache of its own (vLLM); such an engine reads the node agent's
    pool too when ``shared`` names the node (vLLM with kvmarina's KV connector)."""

    cfg: PodConfig
    prefill_tps: float
    domain: str = ""
    shared: str | None = None  # the node whose agent pool the engine also reads (vLLM)
    breaker: Breaker = field(default_factory=Breaker)
    healthy: bool = True
    inflight: int = 0
    queued_tokens: int = 0
    busy_since: float = 0.0
    served: int = 0
    failed: int = 0

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def node(self) -> str:
        return self.cfg.node

    def __post_init__(self) -> None:
        if not self.domain:
            self.domain = self.cfg.node

    def queue_add(self, tokens: int, now: float) -> None:
        if self.queued_tokens <= 0:
            self.busy_since = now
        self.queued_tokens += tokens

    def queue_done(self, tokens: int) -> None:
        """A request's prefill is over (its first byte came, or it failed): its tokens
        leave the queue, and with them the time the engine spent on them."""
        self.queued_tokens -= tokens
        self.busy_since += tokens / self.prefill_tps

    def queue_ahead(self, now: float) -> float:
        """Prefill tokens still ahead of a request sent now. Counting every pending
        token as not yet started made a pod that had just taken a long prompt look busy
        for all of it, and conversations left the engine holding them for a sibling
        that recomputed them (vLLM fleet: ~6 such moves a replay)."""
        if self.queued_tokens <= 0:
            return 0.0
        return max(0.0, self.queued_tokens - self.prefill_tps * (now - self.busy_since))

    def available(self) -> bool:
        return self.healthy and self.breaker.allows()

    def observe_ttft(
        self, uncached_tokens: int, ttft_s: float, queue_s: float, base_tps: float
    ) -> None:
        """Refine the prefill rate from one observed TTFT (EWMA, clamped to 1/4..4x
        of the configured rate so one outlier cannot derail routing)."""
        if uncached_tokens < 64 or ttft_s <= 0:
            return
        spent = max(ttft_s - queue_s, ttft_s * 0.1)
        sample = uncached_tokens / spent
        sample = min(max(sample, base_tps / 4), base_tps * 4)
        self.prefill_tps = 0.8 * self.prefill_tps + 0.2 * sample
