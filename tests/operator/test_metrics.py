"""The operator's Prometheus metrics: the real operator (kopf on kmock's emulator)
reconciles pools and servings while its metrics server is scraped over HTTP."""

from __future__ import annotations

import asyncio
import copy
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvmarina.operator.kube import KubeError
from kvmarina.operator.metrics import OperatorMetrics, serve
from kvmarina.operator.pki import PKIError

REPO = Path(__file__).resolve().parents[2]
API = "/apis/kvmarina.io/v1alpha1"
SERVING = f"{API}/namespaces/default/modelservings/tiny"
POOL = f"{API}/kvcachepools/local"
Cluster = Any  # the ``cluster`` fixture's type (tests/conftest.py)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_for(fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (got := await fn()):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
    return got


def docs() -> tuple[dict[str, Any], dict[str, Any]]:
    pool, serving = yaml.safe_load_all((REPO / "examples" / "local.yaml").read_text())
    for doc in (pool, serving):
        doc["metadata"]["resourceVersion"] = "1"  # the emulator keeps what creators send
        doc["metadata"]["uid"] = f"uid-{doc['metadata']['name']}"
    return pool, serving


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    server = serve(0, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


async def test_reconciles_errors_durations_and_pods_move_as_the_operator_works(
    cluster: Cluster, metrics_url: str
) -> None:
    async def read() -> Samples:
        return await asyncio.to_thread(scrape, metrics_url)

    before = await read()
    pool, serving = docs()
    await cluster.create(pool)
    await cluster.create(serving)
    orphan = copy.deepcopy(serving)
    orphan["metadata"].update(name="orphan", uid="uid-orphan")
    orphan["spec"]["poolRef"] = {"name": "missing"}
    await cluster.create(orphan)

    def moved(now: Samples, name: str, **labels: str) -> float:
        return value(now, name, **labels) - value(before, name, **labels)

    total = "kvmarina_operator_reconciles_total"

    async def counted() -> Samples | None:
        """Every pass below done: the serving's can end before the pool's (the serving
        reads the pool, not its pass), more so on a busy machine."""
        now = await read()
        engines = value(now, "kvmarina_operator_children", component="engine", state="not_ready")
        passes = [
            moved(now, total, kind=kind, result=result)
            for kind, result in (
                ("KVCachePool", "ok"),
                ("ModelServing", "ok"),
                ("ModelServing", "invalid"),
            )
        ]
        return now if engines == 2 and min(passes) >= 1 else None

    during = await wait_for(counted)
    assert moved(during, total, kind="KVCachePool", result="ok") >= 1
    assert moved(during, total, kind="ModelServing", result="ok") >= 1
    assert moved(during, total, kind="ModelServing", result="invalid") >= 1  # the orphan
    count = "kvmarina_operator_reconcile_duration_seconds_count"
    for kind in ("KVCachePool", "ModelServing"):
        assert moved(during, count, kind=kind) >= 1
        assert value(during, "kvmarina_operator_reconcile_duration_seconds_sum", kind=kind) > 0
    # the serving's 2 replicas are planned, none ready (the emulator runs no pods); the
    # orphan plans none and counts for nothing
    assert value(during, "kvmarina_operator_children", component="engine", state="ready") == 0
    assert value(during, "kvmarina_operator_children", component="agent", state="ready") == 0

    # deleting the used pool waits (blocked), then goes once its serving is deleted
    await cluster.call("DELETE", POOL)

    async def blocked() -> Samples | None:
        now = await read()
        return now if moved(now, total, kind="KVCachePool", result="blocked") >= 1 else None

    await wait_for(blocked)
    await cluster.call("DELETE", SERVING)
    await wait_for(lambda: _gone(cluster, POOL))
    after = await read()
    assert value(after, "kvmarina_operator_children", component="engine", state="not_ready") == 0


async def _gone(c: Cluster, path: str) -> bool:
    return await c.get(path) is None


async def test_a_pass_that_raises_is_counted_by_reason_and_still_raises() -> None:
    m = OperatorMetrics()

    async def api_down() -> None:
        raise KubeError(503, "the API server is overloaded")

    async def no_server() -> None:
        raise KubeError(0, "no Kubernetes API")

    async def no_openssl() -> None:
        raise PKIError("no openssl")

    async def bug() -> None:
        raise KeyError("spec")

    for call in (api_down, no_server, no_openssl, bug):
        with pytest.raises((KubeError, PKIError, KeyError)):
            await m.track("KVCachePool", "p", call)

    def sample(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, {"kind": "KVCachePool", **labels})

    for reason in ("api", "network", "pki", "internal"):
        assert sample("kvmarina_operator_reconcile_errors_total", reason=reason) == 1
    assert sample("kvmarina_operator_reconcile_errors_total", reason="timeout") == 0
    assert sample("kvmarina_operator_reconciles_total", result="error") == 4
    assert sample("kvmarina_operator_reconciles_total", result="ok") == 0
    assert sample("kvmarina_operator_reconcile_duration_seconds_count") == 4


async def test_children_count_each_object_once_and_forget_deleted_ones() -> None:
    m = OperatorMetrics()

    async def status(ready: int, wanted: int) -> dict[str, Any]:
        return {"readyReplicas": ready, "replicas": wanted, "conditions": []}

    await m.track("ModelServing", "a/x", lambda: status(0, 2))
    await m.track("ModelServing", "a/x", lambda: status(1, 2))  # the same serving, later
    await m.track("ModelServing", "b/y", lambda: status(3, 2))  # scaling down
    await m.track("KVCachePool", "p", lambda: _pool_status(2, 3))
    assert m.children_totals() == {"agent": (2, 1), "engine": (4, 1)}
    m.forget("ModelServing", "a/x")
    assert m.children_totals()["engine"] == (3, 0)


async def _pool_status(ready: int, desired: int) -> dict[str, Any]:
    return {"nodesReady": ready, "nodesDesired": desired}
