"""Per-pod state the router keeps: health, circuit breaker, load, learned prefill rate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvmarina.load_report import EngineLoad
from kvmarina.router.config import PodConfig

#: how long ``PodState.stored_lately`` remembers what a pod's cache took in: about the
#: time an engine's cache takes to turn over under load (the trace replay's engines:
#: ~30 s)
STORED_HALF_LIFE_S = 30.0
#: engine figures older than this are not used (the engine stopped answering /metrics)
ENGINE_LOAD_STALE_S = 5.0
#: the most a decoding sequence is believed to slow prefill (a batched decode step
#: that took as long as a prefill chunk would double it at 1/occupancy)
MAX_INTERFERENCE = 0.05


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

    Decoding sequences delay a new request's first token only a little: each slows
    the engine's prefill by ``interference`` (learned), and ``engine`` (the load the
    engine reports, ``engine_load``) adds what other routers sent it.

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
    decoding: int = 0  # own requests past their first byte and not finished
    engine: EngineLoad | None = None  # the engine's own figures, as last polled
    engine_at: float = 0.0
    pushed: int = 0  # engine reports pushed on the node's event stream (``LoadRecord``)
    prefilling_at_poll: int = 0  # own requests before their first byte, at that poll
    sent_tokens: int = 0  # own uncached prompt tokens ever sent here
    sent_at_poll: int = 0  # ``sent_tokens`` at the engine's last report
    tokens_per_request: float = 0.0  # uncached prompt tokens sent here (EWMA, looked up)
    interference: float = 0.0  # prefill slowdown per sequence decoding beside it
    usual_occupancy: float = 0.0  # decoding sequences when TTFTs were seen (EWMA)
    stored: float = 0.0  # own uncached prompt tokens sent here, decayed (``stored_lately``)
    stored_at: float = 0.0

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
        self.sent_tokens += tokens
        self.stored = self.stored_lately(now) + tokens
        self.stored_at = now

    def stored_lately(self, now: float) -> float:
        """Uncached prompt tokens sent here lately (halved every ``STORED_HALF_LIFE_S``):
        the blocks the engine's cache took in, each evicting one it held."""
        if not self.stored:
            return 0.0
        return float(self.stored * 0.5 ** ((now - self.stored_at) / STORED_HALF_LIFE_S))

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

    def note_sent(self, uncached: int) -> None:
        a = 0.1 if self.tokens_per_request else 1.0
        self.tokens_per_request += a * (uncached - self.tokens_per_request)

    @property
    def prefilling(self) -> int:
        """Our requests here before their first byte (queued or prefilling)."""
        return self.inflight - self.decoding

    def note_engine(
        self, load: EngineLoad | None, now: float, prefilling: int | None = None
    ) -> None:
        """The engine's own figures, come ``now``. ``prefilling``: our requests before
        their first byte when they were asked for; the engine counted them somewhere
        between then and now, so the more of the two counts is ours (a request whose
        first byte came meanwhile was still waiting in the figure, and read as another
        router's)."""
        self.engine, self.engine_at = load, now
        own = self.prefilling
        self.prefilling_at_poll = own if prefilling is None else max(own, prefilling)
        self.sent_at_poll = self.sent_tokens

    def engine_fresh(self, now: float) -> EngineLoad | None:
        """The engine's last report, unless it is older than ``ENGINE_LOAD_STALE_S``."""
        e = self.engine
        return e if e is not None and now - self.engine_at <= ENGINE_LOAD_STALE_S else None

    def engine_queue(self, now: float) -> float | None:
        """Prefill tokens ahead of a request sent now, every router's, from the
        engine's last report in tokens: what it had queued then, plus what this router
        sent since, less what one prefill server did since; ``None`` without such a
        report. Subtracting this router's own share from the report and draining both
        parts apart had the server do twice its work whenever two replicas had
        prompts queued on one pod."""
        e = self.engine_fresh(now)
        if e is None or e.queued_tokens is None:
            return None
        since = self.sent_tokens - self.sent_at_poll
        return max(0.0, e.queued_tokens + since - self.prefill_tps * (now - self.engine_at))

    def others_waiting(self, now: float) -> float:
        """Prefill tokens other routers queued here, from an engine that reports only
        its counts (vLLM's ``/metrics``): its waiting requests beyond ours, at the
        tokens a request usually costs here, less what one prefill server did since
        (as ``engine_queue``: they were not left waiting until the next report)."""
        e = self.engine_fresh(now)
        if e is None:
            return 0.0
        left = max(0, e.waiting - self.prefilling_at_poll) * self.tokens_per_request
        return max(0.0, left - self.prefill_tps * (now - self.engine_at))

    def occupancy(self, now: float) -> int:
        """Sequences decoding on the engine: its own figure when fresh, else ours."""
        e = self.engine_fresh(now)
        return max(self.decoding, e.running) if e is not None else self.decoding

    def slowdown(self, now: float) -> float:
        """How much slower than usual the engine prefills now (its decode occupancy
        against the usual one, which ``prefill_tps`` was learned at)."""
        a = self.interference
        return (1.0 + a * self.occupancy(now)) / (1.0 + a * self.usual_occupancy)

    def available(self) -> bool:
        return self.healthy and self.breaker.allows()

    def observe_ttft(
        self,
        uncached_tokens: int,
        ttft_s: float,
        queue_s: float,
        base_tps: float,
        occupancy: int = 0,
    ) -> None:
        """Refine the prefill rate and the decode interference from one observed TTFT
        of a request sent while ``occupancy`` sequences decoded there (EWMAs, clamped
        so one outlier cannot derail routing: the rate to 1/4..4x of the configured
        one, the interference to 0..``MAX_INTERFERENCE``).

        The rate is the one seen at the fleet's usual occupancy (``usual_occupancy``);
        the interference explains how a request's rate differs when its engine was
        busier or idler than usual. Learning the rate "without decode" from the
        interference instead fed each back into the other (decode replay: TTFT p50
        from 13 to 87 ms)."""
        if uncached_tokens < 64 or ttft_s <= 0:
            return
        spent = max(ttft_s - queue_s, ttft_s * 0.1)
        sample = uncached_tokens / spent  # the rate this request saw
        delta = occupancy - self.usual_occupancy
        if abs(delta) >= 4:
            seen = (self.prefill_tps / sample - 1.0) / delta
            seen = min(max(seen, 0.0), MAX_INTERFERENCE)
            self.interference += 0.05 * (seen - self.interference)
        self.usual_occupancy += 0.05 * (occupancy - self.usual_occupancy)
        sample = min(max(sample, base_tps / 4), base_tps * 4)
        self.prefill_tps = 0.8 * self.prefill_tps + 0.2 * sample
