"""The operator's Prometheus metrics and the HTTP server that exposes them.

* ``kvmarina_operator_reconciles_total{kind, result}``: passes by custom-resource kind
  and outcome (``ok``; ``invalid``: the spec was refused, see the object's status;
  ``blocked``: a deletion waits, e.g. a pool still in use; ``error``: it raised, and
  kopf retries);
* ``kvmarina_operator_reconcile_errors_total{kind, reason}``: the raising passes by
  cause (``api``: the Kubernetes API answered an error; ``network``: it could not be
  reached; ``timeout``; ``pki``: the pool's certificates could not be made;
  ``internal``: anything else, a bug);
* ``kvmarina_operator_reconcile_duration_seconds{kind}``: time per pass;
* ``kvmarina_operator_children{component, state}``: the pods behind every object the
  operator reconciled, as its last pass counted them (``agent``: a pool's agents,
  scheduled and ready; ``engine``: a serving's engine replicas, wanted and ready).

Every label value is created at zero when the process starts, so that ``rate()`` and
alerts see a series before the first event instead of an absent one.

The server is prometheus_client's own (a daemon thread, not the event loop): a scrape
answers even while kopf's loop is busy, and the operator's HTTP-client rule (only
``kube.py`` and ``scrape.py`` use aiohttp) stays as it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmarina.operator.kube import KubeError
from kvmarina.operator.pki import PKIError

T = TypeVar("T")

PORT_ENV = "KVMARINA_METRICS_PORT"
DEFAULT_PORT = 8081
KINDS = ("KVCachePool", "ModelServing")
RESULTS = ("ok", "invalid", "blocked", "error")
REASONS = ("api", "network", "timeout", "pki", "internal")
STATES = ("ready", "not_ready")
# the pods each kind's status counts: (component, ready field, wanted field)
CHILDREN = {
    "KVCachePool": ("agent", "nodesReady", "nodesDesired"),
    "ModelServing": ("engine", "readyReplicas", "replicas"),
}
# a settled pass costs reads only (milliseconds); one that creates a pool's
# certificates runs openssl (about a second)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def reason(exc: BaseException) -> str:
    if isinstance(exc, KubeError):
        return "api" if exc.status else "network"  # status 0: no API server configured
    if isinstance(exc, PKIError):
        return "pki"
    if isinstance(exc, TimeoutError):
        return "timeout"
    # aiohttp's client errors, named without importing aiohttp here (kube.py owns it)
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] == "aiohttp":
        return "network"
    return "internal"


def result(out: object) -> str:
    """The outcome of a pass that returned ``out``: a desired status (refused when its
    InvalidSpec condition is true), why a deletion must wait, or nothing."""
    if isinstance(out, dict):
        for c in out.get("conditions") or []:
            if c.get("type") == "InvalidSpec" and c.get("status") == "True":
                return "invalid"
        return "ok"
    if isinstance(out, str) and out:
        return "blocked"
    return "ok"


class _Children(Collector):
    def __init__(self, owner: OperatorMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "kvmarina_operator_children",
            "Pods behind the reconciled objects by component and readiness, as the last "
            "pass of each object counted them",
            labels=["component", "state"],
        )
        for component, (ready, not_ready) in self.owner.children_totals().items():
            fam.add_metric([component, "ready"], ready)
            fam.add_metric([component, "not_ready"], not_ready)
        yield fam


class OperatorMetrics:
    """The operator's metrics, in a registry of their own (with the process's figures)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.reconciles = Counter(
            "kvmarina_operator_reconciles",
            "Reconcile passes by kind and result (ok, invalid, blocked, error)",
            ["kind", "result"],
            registry=r,
        )
        self.errors = Counter(
            "kvmarina_operator_reconcile_errors",
            "Reconcile passes that raised, by kind and reason (api, network, timeout, pki, "
            "internal); kopf retries them",
            ["kind", "reason"],
            registry=r,
        )
        self.duration = Histogram(
            "kvmarina_operator_reconcile_duration_seconds",
            "Time of a reconcile pass by kind",
            ["kind"],
            buckets=BUCKETS,
            registry=r,
        )
        # (kind, object) -> (ready, wanted); read by the scrape thread
        self._children: dict[tuple[str, str], tuple[int, int]] = {}
        self._lock = threading.Lock()
        r.register(_Children(self))
        for kind in KINDS:
            self.duration.labels(kind)
            for res in RESULTS:
                self.reconciles.labels(kind, res)
            for why in REASONS:
                self.errors.labels(kind, why)

    async def track(self, kind: str, obj: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one pass of ``obj`` (a ``kind``), counting and timing it; the pods its
        returned status counts become that object's share of the children gauge."""
        start = time.perf_counter()
        try:
            out = await call()
        except Exception as exc:
            self.duration.labels(kind).observe(time.perf_counter() - start)
            self.reconciles.labels(kind, "error").inc()
            self.errors.labels(kind, reason(exc)).inc()
            raise
        self.duration.labels(kind).observe(time.perf_counter() - start)
        self.reconciles.labels(kind, result(out)).inc()
        if isinstance(out, dict):
            self._count_children(kind, obj, out)
        return out

    def _count_children(self, kind: str, obj: str, status: dict[str, Any]) -> None:
        _, ready_key, wanted_key = CHILDREN[kind]
        ready, wanted = status.get(ready_key), status.get(wanted_key)
        with self._lock:
            if isinstance(ready, int) and isinstance(wanted, int):
                self._children[(kind, obj)] = (ready, wanted)
            else:  # a refused spec plans no pods: its old count would be stale
                self._children.pop((kind, obj), None)

    def forget(self, kind: str, obj: str) -> None:
        """The object is gone: its pods no longer count."""
        with self._lock:
            self._children.pop((kind, obj), None)

    def forget_all(self) -> None:
        with self._lock:
            self._children.clear()

    def children_totals(self) -> dict[str, tuple[int, int]]:
        """(ready, not ready) pods by component; an object with more ready pods than it
        wants (a scale-down under way) does not hide another's missing ones."""
        totals = {component: (0, 0) for component, _, _ in CHILDREN.values()}
        with self._lock:
            for (kind, _), (ready, wanted) in self._children.items():
                component = CHILDREN[kind][0]
                r, missing = totals[component]
                totals[component] = (r + ready, missing + max(0, wanted - ready))
        return totals


METRICS = OperatorMetrics()


def serve(port: int, addr: str = "0.0.0.0", metrics: OperatorMetrics = METRICS) -> WSGIServer:
    """Serve ``/metrics`` on ``addr:port`` (0: a free port, see ``server_port``) from a
    daemon thread; ``shutdown()`` stops it."""
    server, _ = start_http_server(port, addr, registry=metrics.registry)
    return server
