"""The router's Prometheus metrics (its own registry, so tests can run many routers);
the request path's counters and histograms are ``router.counters``' lock-free ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from kvmarina.router.counters import Counter, Histogram

#: reasons a vLLM pod's KV events are not followed (labels of ``engine_event_errors``)
EVENT_ERRORS = ("unreachable", "garbage", "block_size", "silent")


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvmarina_router_requests", "Requests answered", ["endpoint", "code"], registry=r
        )
        self.routed = Counter(
            "kvmarina_router_routed", "Requests sent to each pod", ["pod"], registry=r
        )
        self.retries = Counter("kvmarina_router_retries", "Retries on the next pod", registry=r)
        self.moves = Counter(
            "kvmarina_router_moves",
            "Requests taken back from a pod that had another router's prompt ahead",
            registry=r,
        )
        self.rejected = Counter(
            "kvmarina_router_rejected", "Requests refused with 429 (queue full)", registry=r
        )
        self.pull_hints = Counter(
            "kvmarina_router_pull_hints", "Requests sent with a pull hint", registry=r
        )
        self.cached_tokens = Counter(
            "kvmarina_router_expected_cached_tokens", "Prompt tokens expected cached", registry=r
        )
        self.prompt_tokens = Counter(
            "kvmarina_router_prompt_tokens", "Prompt tokens routed", registry=r
        )
        self.decision = Histogram(
            "kvmarina_router_decision_seconds",
            "Hash + lookup + scoring time",
            buckets=(1e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2),
            registry=r,
        )
        self.ttft = Histogram(
            "kvmarina_router_ttft_seconds",
            "Time to first byte from the pod",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.index_blocks = Gauge(
            "kvmarina_router_index_blocks", "Entries in the block index", ["index"], registry=r
        )
        self.index_cap = Gauge(
            "kvmarina_router_index_max_blocks", "LRU cap of the block index", registry=r
        )
        self.index_evictions = Gauge(
            "kvmarina_router_index_lru_evictions",
            "Index entries dropped by the LRU cap",
            ["index"],
            registry=r,
        )
        self.mode = Gauge(
            "kvmarina_router_index_mode", "1 for the mode in use", ["mode"], registry=r
        )
        self.live_nodes = Gauge(
            "kvmarina_router_event_streams_live",
            "Agent event streams that are current",
            registry=r,
        )
        self.events = Gauge(
            "kvmarina_router_events_applied", "Block events applied", ["node"], registry=r
        )
        self.pod_inflight = Gauge(
            "kvmarina_router_pod_inflight", "Requests in flight per pod", ["pod"], registry=r
        )
        self.pod_healthy = Gauge(
            "kvmarina_router_pod_available",
            "1 if healthy and breaker closed",
            ["pod"],
            registry=r,
        )
        self.pod_rate = Gauge(
            "kvmarina_router_pod_prefill_tokens_per_second",
            "Learned prefill rate",
            ["pod"],
            registry=r,
        )
        self.pod_pushed = Gauge(
            "kvmarina_router_pod_load_pushes",
            "Load reports the engine pushed through its node agent's event stream",
            ["pod"],
            registry=r,
        )
        self.pull_latency = Gauge(
            "kvmarina_router_pull_latency_seconds",
            "Learned fixed cost of a hinted pull, beyond its bytes",
            registry=r,
        )
        self.queue = Gauge("kvmarina_router_queue", "Requests waiting for a slot", registry=r)
        self.inflight = Gauge("kvmarina_router_inflight", "Requests being proxied", registry=r)
        self.engine_connected = Gauge(
            "kvmarina_router_engine_events_connected",
            "1 while the router is connected to the pod's KV-event publisher (vLLM)",
            ["pod"],
            registry=r,
        )
        self.engine_live = Gauge(
            "kvmarina_router_engine_events_live",
            "1 while the router routes the pod from its KV events (else from its own record)",
            ["pod"],
            registry=r,
        )
        self.engine_seq = Gauge(
            "kvmarina_router_engine_events_last_seq",
            "Sequence number of the pod's last KV-event batch applied",
            ["pod"],
            registry=r,
        )
        self.engine_lag = Gauge(
            "kvmarina_router_engine_events_lag_seconds",
            "Age of the pod's last KV-event batch when it arrived",
            ["pod"],
            registry=r,
        )
        self.engine_gaps = Gauge(
            "kvmarina_router_engine_events_gaps",
            "Sequence gaps seen in the pod's KV events (each replayed or resynced)",
            ["pod"],
            registry=r,
        )
        self.engine_resyncs = Gauge(
            "kvmarina_router_engine_events_resyncs",
            "Gaps the replay service could not fill: the pod's index started over",
            ["pod"],
            registry=r,
        )
        self.engine_errors = Gauge(
            "kvmarina_router_engine_events_errors",
            "Episodes of unreadable KV events, by reason (unreachable, garbage, block_size, "
            "silent)",
            ["pod", "reason"],
            registry=r,
        )

    def engine_events(self, pod: str, h: Mapping[str, Any]) -> None:
        """Set one vLLM pod's event-health gauges from ``VLLMFollower.health()``."""
        self.engine_connected.labels(pod).set(1 if h["connected"] else 0)
        self.engine_live.labels(pod).set(1 if h["live"] else 0)
        self.engine_seq.labels(pod).set(h["last_seq"] if h["last_seq"] is not None else -1)
        self.engine_lag.labels(pod).set(h["lag_s"] or 0.0)
        self.engine_gaps.labels(pod).set(h["gaps"])
        self.engine_resyncs.labels(pod).set(h["resyncs"])
        for reason in EVENT_ERRORS:
            self.engine_errors.labels(pod, reason).set(h["errors"].get(reason, 0))
