"""The real operator (kopf) running against kmock's Kubernetes API emulator over HTTP:
the scenarios of the issue."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

from kvmarina.operator.components import Endpoint
from kvmarina.operator.plan_pool import plan_pool
from kvmarina.operator.plan_serving import plan_serving
from kvmarina.operator.reconcile import contains, key_of
from kvmarina.operator.settings import Settings
from kvmarina.validate import parse_resource

REPO = Path(__file__).resolve().parents[2]
NS = "kvmarina-system"
API = "/apis/kvmarina.io/v1alpha1"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
_server: dict[str, str] = {}

# The timers' interval is fixed when the handlers module is imported: short for tests.
_saved = os.environ.get("KVMARINA_RESYNC_SECONDS")
os.environ["KVMARINA_RESYNC_SECONDS"] = "1"
from kvmarina.operator import handlers  # noqa: E402

if _saved is None:
    del os.environ["KVMARINA_RESYNC_SECONDS"]
else:
    os.environ["KVMARINA_RESYNC_SECONDS"] = _saved


@kopf.on.login()
def _login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_server["url"])


class Cluster:
    """The emulator's URL, plain HTTP helpers, and an operator that can be restarted."""

    def __init__(self, kmock: Any, url: str) -> None:
        self.kmock, self.url = kmock, url
        self._task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        self._task = asyncio.create_task(
            kopf.operator(settings=settings, clusterwide=True, standalone=True)
        )
        handlers._reconciler = None

    async def stop(self) -> None:
        """Cancel the operator, as a killed pod would stop (a graceful stop waits 5 s
        for the emulator's own never-ending watch handlers, which kopf counts as its)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(self._task, 10)
        self._task = None
        await handlers.close()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.url + path, json=body) as r,
        ):
            text = await r.text()
            try:
                return r.status, (await r.json(content_type=None)) if text else None
            except ValueError:
                return r.status, text

    async def get(self, path: str) -> Any:
        status, body = await self.call("GET", path)
        return body if status == 200 else None

    async def create(self, doc: dict[str, Any]) -> None:
        ns = doc["metadata"].get("namespace")
        plural = {"KVCachePool": "kvcachepools", "ModelServing": "modelservings"}[doc["kind"]]
        path = f"{API}/namespaces/{ns}/{plural}" if ns else f"{API}/{plural}"
        status, body = await self.call("POST", path, doc)
        assert status < 300, body

    def served(self) -> int:
        return len(list(self.kmock))

    def writes(self, since: int = 0) -> list[str]:
        """Object-changing requests the emulator served (``METHOD path``) after ``since``."""
        out = []
        for r in list(self.kmock)[since:]:
            method = str(getattr(r.method, "value", r.method)).upper()
            if method in ("POST", "PATCH", "PUT", "DELETE"):
                out.append(f"{method} {r.url.path}")
        return out


@pytest.fixture
async def cluster(kmock: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    kmock.resources.load_bundled()
    kmock.resources["kvmarina.io/v1alpha1/kvcachepools"] = {
        "kind": "KVCachePool",
        "namespaced": False,
        "verbs": VERBS,
        "subresources": {"status"},
    }
    kmock.resources["kvmarina.io/v1alpha1/modelservings"] = {
        "kind": "ModelServing",
        "namespaced": True,
        "verbs": VERBS,
        "subresources": {"status"},
    }
    url = str(kmock.url).rstrip("/")
    _server["url"] = url
    monkeypatch.setenv("KVMARINA_KUBE_SERVER", url)
    monkeypatch.setenv("KVMARINA_OPERATOR_NAMESPACE", NS)
    monkeypatch.setenv("KVMARINA_RESYNC_SECONDS", "1")
    monkeypatch.setattr(handlers, "SETTINGS", handlers.Settings.from_env())
    c = Cluster(kmock, url)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def wait_for(fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        await asyncio.sleep(0.1)


_EXAMPLE = list(yaml.safe_load_all((REPO / "examples" / "local.yaml").read_text()))


def docs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The local example's pool and serving, as a client would create them."""
    pool, serving = copy.deepcopy(_EXAMPLE)
    # kopf guards its patches with the object's resourceVersion; the emulator keeps
    # whatever the creator sent
    for doc in (pool, serving):
        doc["metadata"]["resourceVersion"] = "1"
        doc["metadata"]["uid"] = f"uid-{doc['metadata']['name']}"
    return pool, serving


def secret_files(secret: dict[str, Any] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in ((secret or {}).get("data") or {}).items()}


def conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


# -------------------------------------------------------------------- scenarios

DEP = "/apis/apps/v1/namespaces/default/deployments"
SVC = "/api/v1/namespaces/default/services"
SERVING = f"{API}/namespaces/default/modelservings/tiny"
CREDS = f"/api/v1/namespaces/{NS}/secrets/kvmarina-pool-local-servings"
TRANSFER = f"/api/v1/namespaces/{NS}/secrets/kvmarina-pool-local-transfer"


def url_of(m: dict[str, Any]) -> str:
    from kvmarina.operator.kube import path

    meta = m["metadata"]
    return path(m["apiVersion"], m["kind"], meta.get("namespace"), meta["name"])


async def settled(c: Cluster, path: str = SERVING) -> dict[str, Any]:
    async def ready() -> Any:
        obj = await c.get(path)
        return obj if "Progressing" in conditions(obj) else None

    return await wait_for(ready)  # type: ignore[no-any-return]


async def up(c: Cluster) -> tuple[dict[str, Any], dict[str, Any]]:
    pool, serving = docs()
    await c.create(pool)
    await c.create(serving)
    await settled(c)
    await wait_for(lambda: _has_credential(c, "default.tiny.yaml"))
    return pool, serving


async def _has_credential(c: Cluster, key: str) -> bool:
    return key in secret_files(await c.get(CREDS))


async def test_every_child_appears_with_the_planned_content(cluster: Cluster) -> None:
    pool_doc, serving_doc = await up(cluster)
    settings = Settings.from_env()
    pool = parse_resource(pool_doc)
    transfer = secret_files(await cluster.get(TRANSFER))
    assert set(transfer) == {"token"} and len(transfer["token"]) >= 32
    token = secret_files(await cluster.get(f"{SVC[:-9]}/secrets/tiny-kvmarina-token"))["token"]
    planned = plan_pool(pool, "uid-local", settings, transfer) + plan_serving(
        parse_resource(serving_doc), "uid-tiny", pool, settings, token, []
    )
    kinds = {m["kind"] for m in planned}
    assert kinds >= {"DaemonSet", "Service", "ConfigMap", "Secret", "Deployment", "NetworkPolicy"}
    assert "PodDisruptionBudget" in kinds
    for m in planned:
        live = await cluster.get(url_of(m))
        assert live is not None and contains(live, m), key_of(m)
    # the agents learn the serving's credential (its own file in the pool's Secret)
    entry = yaml.safe_load(secret_files(await cluster.get(CREDS))["default.tiny.yaml"])
    assert entry == {
        "servings": [{"name": "tiny", "namespace": "default", "scope": "namespace", "token": token}]
    }
    st = (await cluster.get(SERVING))["status"]
    assert st["replicas"] == 2 and st["readyReplicas"] == 0
    assert st["routerUrl"] == "http://tiny-router.default.svc.cluster.local"
    assert conditions(await cluster.get(SERVING))["InvalidSpec"]["status"] == "False"
    pool_st = await settled(cluster, f"{API}/kvcachepools/local")
    assert conditions(pool_st)["Degraded"]["status"] == "False"


async def test_router_config_follows_the_ready_engine_pods(cluster: Cluster) -> None:
    await up(cluster)
    pods = "/api/v1/namespaces/{}/pods"
    agent = {
        "metadata": {
            "name": "agent-a",
            "namespace": NS,
            "labels": {
                "app.kubernetes.io/component": "agent",
                "app.kubernetes.io/instance": "pool-local",
            },
        },
        "spec": {"nodeName": "node-a"},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    engine = {
        "metadata": {
            "name": "tiny-engine-x",
            "namespace": "default",
            "labels": {
                "app.kubernetes.io/component": "engine",
                "app.kubernetes.io/instance": "tiny",
            },
        },
        "spec": {"nodeName": "node-a"},
        "status": {"podIP": "10.0.1.7", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    await cluster.call("POST", pods.format(NS), agent)
    await cluster.call("POST", pods.format("default"), engine)

    async def routed() -> Any:
        cm = await cluster.get("/api/v1/namespaces/default/configmaps/tiny-router-config")
        return cm and yaml.safe_load(cm["data"]["router.json"])

    cfg = await wait_for(routed)
    assert cfg["pods"] == [
        {
            "name": "tiny-engine-x",
            "url": "http://10.0.1.7:8000",
            "node": "node-a",
            "agent_url": "http://10.0.0.1:7470",
        }
    ]
    assert Endpoint("tiny-engine-x", "http://10.0.1.7:8000", "node-a", "http://10.0.0.1:7470")


async def test_updates_apply_in_place_and_hand_deleted_children_return(cluster: Cluster) -> None:
    await up(cluster)
    # a child deleted by hand is restored by the next reconcile
    await cluster.call("DELETE", f"{SVC}/tiny-router")
    assert await wait_for(lambda: cluster.get(f"{SVC}/tiny-router"))
    # a child edited by hand is put back
    await cluster.call("PATCH", f"{DEP}/tiny-engine", {"spec": {"replicas": 7}})

    async def replicas(n: int) -> bool:
        d = await cluster.get(f"{DEP}/tiny-engine")
        return bool(d and d["spec"]["replicas"] == n)

    await wait_for(lambda: replicas(2))
    # spec updates change the children in place; optional children come and go
    patch = {
        "spec": {
            "replicas": 3,
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4},
            "networkPolicy": {"enabled": False},
        }
    }
    await cluster.call("PATCH", SERVING, patch)
    await wait_for(lambda: replicas(3))
    hpa = "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers/tiny-engine"
    assert (await wait_for(lambda: cluster.get(hpa)))["spec"]["maxReplicas"] == 4

    async def no_policy() -> bool:
        np = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/tiny-engine"
        return await cluster.get(np) is None

    await wait_for(no_policy)
    await cluster.call(
        "PATCH", f"{API}/kvcachepools/local", {"spec": {"memory": {"device": "1Gi"}}}
    )

    async def agent_config_grew() -> bool:
        cm = await cluster.get(f"/api/v1/namespaces/{NS}/configmaps/kvmarina-pool-local")
        return "device_bytes: 1073741824" in cm["data"]["agent.yaml"]

    await wait_for(agent_config_grew)


async def test_invalid_specs_get_invalid_spec_and_no_children(cluster: Cluster) -> None:
    pool, serving = docs()
    await cluster.create(pool)
    cases = {
        "orphan": ({"poolRef": {"name": "missing"}}, "does not exist"),
        "greedy": ({"budget": {"min": "0", "max": "2Gi"}}, "exceeds KVCachePool 'local'"),
        "blocky": ({"engine": {"args": ["--block-size", "32"]}}, "remove the flag"),
    }
    for name, (spec, _) in cases.items():
        doc = {**serving, "metadata": {**serving["metadata"], "name": name, "uid": f"u-{name}"}}
        doc["spec"] = {**serving["spec"], **spec}
        await cluster.create(doc)
    for name, (_, message) in cases.items():
        obj = await settled(cluster, f"{API}/namespaces/default/modelservings/{name}")
        cond = conditions(obj)
        assert cond["InvalidSpec"]["status"] == "True", cond
        assert message in cond["InvalidSpec"]["message"], cond["InvalidSpec"]["message"]
        assert cond["Ready"]["status"] == "False"
        assert await cluster.get(f"{DEP}/{name}-engine") is None
        assert (
            await cluster.get(f"/api/v1/namespaces/default/secrets/{name}-kvmarina-token") is None
        )


async def test_a_used_pool_waits_for_its_servings(cluster: Cluster) -> None:
    await up(cluster)
    await cluster.call("DELETE", f"{API}/kvcachepools/local")

    async def blocked() -> Any:
        ready = conditions(await cluster.get(f"{API}/kvcachepools/local")).get("Ready", {})
        return ready if ready.get("reason") == "InUse" else None

    cond = await wait_for(blocked)
    assert "default/tiny" in cond["message"] and "delete those first" in cond["message"]
    await cluster.call("DELETE", SERVING)
    # the serving's credential is withdrawn, then the pool goes
    await wait_for(lambda: _gone(cluster, SERVING))
    assert not await _has_credential(cluster, "default.tiny.yaml")
    await wait_for(lambda: _gone(cluster, f"{API}/kvcachepools/local"))


async def _gone(c: Cluster, path: str) -> bool:
    return await c.get(path) is None


async def test_transfer_credentials_are_kept_and_rotated_on_request(cluster: Cluster) -> None:
    pool, _ = docs()
    pool["spec"]["migration"]["auth"] = "mtls"
    await cluster.create(pool)
    first = await wait_for(lambda: _transfer(cluster))
    assert set(first) == {"token", "ca.crt", "tls.crt", "tls.key"}
    assert first["tls.crt"].startswith("-----BEGIN CERTIFICATE-----")
    await cluster.call("PATCH", f"{API}/kvcachepools/local", {"spec": {"agent": {"image": "x:1"}}})

    async def image_updated() -> bool:
        ds = await cluster.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/kvmarina-agent-local")
        return bool(ds and ds["spec"]["template"]["spec"]["containers"][0]["image"] == "x:1")

    await wait_for(image_updated)
    assert await _transfer(cluster) == first  # kept on update
    rotate = {"metadata": {"annotations": {"kvmarina.io/rotate-credentials": "2026-01-01"}}}
    await cluster.call("PATCH", f"{API}/kvcachepools/local", rotate)

    async def rotated() -> Any:
        now = await _transfer(cluster)
        return now if now and now["token"] != first["token"] else None

    second = await wait_for(rotated)
    assert second["ca.crt"] != first["ca.crt"]
    await asyncio.sleep(2.5)  # later passes keep the rotated credentials
    assert await _transfer(cluster) == second


async def _transfer(c: Cluster) -> dict[str, str] | None:
    return secret_files(await c.get(TRANSFER)) or None


async def test_restart_makes_no_duplicates_and_no_spurious_writes(cluster: Cluster) -> None:
    await up(cluster)
    await asyncio.sleep(2.5)  # timers have run: the fleet is settled
    before = cluster.served()
    await asyncio.sleep(2.5)
    assert cluster.writes(before) == []  # a settled fleet is only read
    await cluster.stop()
    before = cluster.served()
    await cluster.start()
    await asyncio.sleep(3.5)  # resume handlers and a few timer passes
    assert cluster.served() > before + 20  # it did reconcile (reads) ...
    assert cluster.writes(before) == []  # ... and changed nothing
    deps = await cluster.get(DEP)
    assert sorted(d["metadata"]["name"] for d in deps["items"]) == ["tiny-engine", "tiny-router"]
