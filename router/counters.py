"""Counters and histograms for the request path, exported through prometheus_client.

Why not prometheus_client's own: each ``inc`` takes a lock and checks the metric's
state, each ``observe`` walks the buckets in Python; six of them a request were about
5 % of the router's CPU per proxied request. The router runs its request path on one
event loop thread, so a plain attribute add is enough here; a scrape reads the values
through ``collect`` like any collector's.

Invariant: ``Histogram.counts[i]`` counts the observations in ``(bounds[i-1],
bounds[i]]`` (the last slot: above every bound); exported buckets are cumulative."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class Count:
    """One counter's value (one label combination)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Counter(Collector):
    """A counter, optionally with labels (``labels(...)`` gives a ``Count``)."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._children: dict[tuple[str, ...], Count] = {}
        self._plain = Count()
        if registry is not None:
            registry.register(self)

    @property
    def value(self) -> float:
        return self._plain.value

    def inc(self, amount: float = 1.0) -> None:
        self._plain.value += amount

    def labels(self, *values: str) -> Count:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = Count()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        if self.labelnames:
            for values, child in sorted(self._children.items()):
                family.add_metric(list(values), child.value)
        else:
            family.add_metric([], self._plain.value)
        yield family


class Histogram(Collector):
    """A histogram without labels over fixed ``buckets`` (upper bounds, ascending)."""

    def __init__(
        self,
        name: str,
        doc: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        if list(buckets) != sorted(buckets):
            raise ValueError(f"{name}: buckets must ascend")
        self.name, self.doc = name, doc
        self.bounds = [float(b) for b in buckets]
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, running = [], 0
        for bound, n in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += n
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], cumulative, self.sum)
        yield family
