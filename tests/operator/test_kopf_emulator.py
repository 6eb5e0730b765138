"""The real operator (kopf) against kmock's Kubernetes API emulator over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NS = "kvmarina-system"
API = "/apis/kvmarina.io/v1alpha1"


async def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url + path, json=body) as r:
        text = await r.text()
        try:
            return r.status, (await r.json(content_type=None)) if text else None
        except ValueError:
            return r.status, text


async def wait_for(fn: Any, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.2)


@pytest.fixture
async def operator(kmock: Any) -> AsyncIterator[str]:
    kmock.resources.load_bundled()
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    kmock.resources["kvmarina.io/v1alpha1/kvcachepools"] = {
        "kind": "KVCachePool",
        "namespaced": False,
        "verbs": verbs,
        "subresources": {"status"},
    }
    kmock.resources["kvmarina.io/v1alpha1/modelservings"] = {
        "kind": "ModelServing",
        "namespaced": True,
        "verbs": verbs,
        "subresources": {"status"},
    }
    url = str(kmock.url).rstrip("/")
    os.environ["KVMARINA_KUBE_SERVER"] = url
    os.environ["KVMARINA_OPERATOR_NAMESPACE"] = NS
    os.environ["KVMARINA_RESYNC_SECONDS"] = "1"
    from kvmarina.operator import handlers

    handlers.SETTINGS = handlers.Settings.from_env()
    handlers._client = None

    @kopf.on.login()
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url)

    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        kopf.operator(settings=settings, clusterwide=True, stop_flag=stop, standalone=True)
    )
    try:
        yield url
    finally:
        stop.set_result(None)
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, 10)
        await handlers.close()


def docs() -> tuple[dict[str, Any], dict[str, Any]]:
    pool, serving = list(yaml.safe_load_all((REPO / "examples" / "local.yaml").read_text()))
    # kopf guards its patches with the object's resourceVersion; the emulator keeps
    # whatever the creator sent
    for doc in (pool, serving):
        doc["metadata"]["resourceVersion"] = "1"
        doc["metadata"]["uid"] = f"uid-{doc['metadata']['name']}"
    return pool, serving


async def get(url: str, path: str) -> Any:
    status, body = await call(url, "GET", path)
    return body if status == 200 else None


async def test_pool_and_serving_become_children(operator: str) -> None:
    url = operator
    pool, serving = docs()
    assert (await call(url, "POST", f"{API}/kvcachepools", pool))[0] < 300
    assert (await call(url, "POST", f"{API}/namespaces/default/modelservings", serving))[0] < 300
    ds = await wait_for(
        lambda: get(url, f"/apis/apps/v1/namespaces/{NS}/daemonsets/kvmarina-agent-local")
    )
    assert ds["spec"]["template"]["spec"]["containers"][0]["args"] == ["agent"]
    cm = await get(url, f"/api/v1/namespaces/{NS}/configmaps/kvmarina-pool-local")
    assert "block_size: 16" in cm["data"]["agent.yaml"]
    eng = await wait_for(
        lambda: get(url, "/apis/apps/v1/namespaces/default/deployments/tiny-engine")
    )
    env = {e["name"]: e["value"] for e in eng["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KVMARINA_ENGINE_PRESET"] == "tiny" and env["KVMARINA_ENGINE_BLOCK_SIZE"] == "16"
    assert await get(url, "/api/v1/namespaces/default/services/tiny-router")
    assert await get(url, "/api/v1/namespaces/default/secrets/tiny-kvmarina-token")
    # the pool's agents learn the serving's credential
    creds = await wait_for(lambda: _creds_has(url, "tiny"))
    assert creds
    st = await wait_for(lambda: _status(url, f"{API}/namespaces/default/modelservings/tiny"))
    assert {c["type"] for c in st["conditions"]} >= {"Ready", "Progressing", "InvalidSpec"}, st[
        "conditions"
    ]

    # a child deleted by hand is restored by the next reconcile
    await call(url, "DELETE", "/api/v1/namespaces/default/services/tiny-router")
    assert await wait_for(lambda: get(url, "/api/v1/namespaces/default/services/tiny-router"))

    # an update changes the children in place
    serving["spec"]["replicas"] = 3
    await call(
        url, "PATCH", f"{API}/namespaces/default/modelservings/tiny", {"spec": {"replicas": 3}}
    )

    async def scaled() -> bool:
        d = await get(url, "/apis/apps/v1/namespaces/default/deployments/tiny-engine")
        return bool(d and d["spec"]["replicas"] == 3)

    assert await wait_for(scaled)


async def _creds_has(url: str, name: str) -> bool:
    sec = await get(url, f"/api/v1/namespaces/{NS}/secrets/kvmarina-pool-local-servings")
    if not sec:
        return False
    import base64

    data = (
        sec.get("stringData", {}).get("credentials.yaml")
        or base64.b64decode(sec.get("data", {}).get("credentials.yaml", "")).decode()
    )
    return f"name: {name}" in data


async def _status(url: str, path: str) -> Any:
    obj = await get(url, path)
    return (obj or {}).get("status", {}).get("conditions") and obj["status"]


async def test_invalid_spec_creates_no_children(operator: str) -> None:
    url = operator
    _, serving = docs()
    serving["metadata"]["name"] = "orphan"
    serving["spec"]["poolRef"]["name"] = "missing"
    await call(url, "POST", f"{API}/namespaces/default/modelservings", serving)
    st = await wait_for(lambda: _status(url, f"{API}/namespaces/default/modelservings/orphan"))
    invalid = next(c for c in st["conditions"] if c["type"] == "InvalidSpec")
    assert invalid["status"] == "True" and "does not exist" in invalid["message"]
    assert await get(url, "/apis/apps/v1/namespaces/default/deployments/orphan-engine") is None


async def test_deleting_a_used_pool_waits_and_says_why(operator: str) -> None:
    url = operator
    pool, serving = docs()
    await call(url, "POST", f"{API}/kvcachepools", pool)
    await call(url, "POST", f"{API}/namespaces/default/modelservings", serving)
    await wait_for(lambda: get(url, "/apis/apps/v1/namespaces/default/deployments/tiny-engine"))
    await call(url, "DELETE", f"{API}/kvcachepools/local")

    async def blocked() -> Any:
        obj = await get(url, f"{API}/kvcachepools/local")
        conds = ((obj or {}).get("status") or {}).get("conditions") or []
        return [c for c in conds if c.get("reason") == "InUse"]

    (cond,) = await wait_for(blocked)
    assert "tiny" in cond["message"] and "delete those first" in cond["message"]
