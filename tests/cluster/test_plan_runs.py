"""What the operator plans, run as a kubelet would run it, with a real model.

The operator (kopf, against the API emulator) turns a KVCachePool and a ModelServing
into an agent DaemonSet, engine and router Deployments, ConfigMaps and Secrets; the
harness's kubelet (``kubelet.py``) runs those pods on two nodes, each in a network and
mount namespace of its own, as their images' users; then a chat request goes through
the planned router, twice, and the second finds its prefix cached.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .kubelet import Kubelet

REPO = Path(__file__).resolve().parents[2]
API = "/apis/kvmarina.io/v1alpha1"
POOL = {
    "apiVersion": "kvmarina.io/v1alpha1",
    "kind": "KVCachePool",
    "metadata": {"name": "cpu", "resourceVersion": "1", "uid": "uid-pool"},
    "spec": {
        "memory": {"backend": "cpu", "device": "64Mi", "pageSize": "2Mi"},
        "migration": {"auth": "token"},
    },
}


def serving(name: str, model: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kvmarina.io/v1alpha1",
        "kind": "ModelServing",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                     "uid": f"uid-{name}"},
        "spec": {"poolRef": {"name": "cpu"}, "model": model, "replicas": 2,
                 "budget": {"max": "32Mi"}, **spec},
    }  # fmt: skip


async def ready(cluster: Any, kubelet: Kubelet, name: str, timeout: float = 180) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        obj = await cluster.get(f"{API}/namespaces/default/modelservings/{name}")
        conds = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}
        if conds.get("Ready", {}).get("status") == "True":
            return obj  # type: ignore[no-any-return]
        if asyncio.get_running_loop().time() > deadline:
            pods = (await cluster.get("/api/v1/namespaces/default/pods") or {}).get("items", [])
            seen = {p["metadata"]["name"]: (p.get("status") or {}).get("conditions") for p in pods}
            maps = (await cluster.get("/api/v1/namespaces/default/configmaps") or {}).get("items")
            errors = list(dict.fromkeys(kubelet.errors))[:5]  # the first, once each
            raise AssertionError(
                f"{name} not Ready: {json.dumps(conds, indent=1)}\nkubelet: {errors}"
                f"\npods: {seen}\nconfigmaps: {[m['metadata']['name'] for m in maps or []]}"
            )
        await asyncio.sleep(0.5)


async def chat(http: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You are the assistant of a kayak shop. " * 10},
        {"role": "user", "content": "Which paddle length for a 4 m touring kayak?"},
    ]
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def test_a_serving_on_real_weights_runs_as_planned(
    cluster: Any, kubelet: Kubelet, tmp_path: Path
) -> None:
    """``examples/cpu-cluster.yaml`` as the README's "Install on a cluster" applies it."""
    from kvmarina.engine.weights import export_preset

    export_preset("tiny", "float32", tmp_path / "models" / "tiny-hf")  # the claim's content
    for i, doc in enumerate(yaml.safe_load_all((REPO / "examples/cpu-cluster.yaml").open())):
        doc["metadata"].update(resourceVersion="1", uid=f"uid-{i}")
        await cluster.create(doc)
    await ready(cluster, kubelet, "tiny")
    (router,) = kubelet.pod_ips("default", "router")
    url = f"http://{router}:8080"
    async with aiohttp.ClientSession() as http:
        first = await chat(http, url, "tiny-hf")
        again = await chat(http, url, "tiny-hf")
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= again["usage"]["prompt_tokens"] - 16, again["usage"]
    # the engines push their load through their node agents, named as the router
    # knows them (the pod name the downward API gave them)
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        metrics = await r.text()
    pushes = re.findall(r'kvmarina_router_pod_load_pushes\{pod="([^"]+)"\} (\S+)', metrics)
    assert len(pushes) == 2 and sum(float(n) for _, n in pushes) >= 2, pushes


async def test_a_simulated_serving_runs_as_planned(cluster: Any, kubelet: Kubelet) -> None:
    """``engine.simulate``: the simulator takes the pod's address, model name and the
    router's model identity from the variables the operator sets, so it gets ready and
    the router's hashes find its cache."""
    await cluster.create(POOL)
    doc = serving("sim", {"name": "tiny-sim", "preset": "tiny"}, engine={"simulate": True})
    await cluster.create(doc)
    await ready(cluster, kubelet, "sim")
    (router,) = kubelet.pod_ips("default", "router")
    async with aiohttp.ClientSession() as http:
        await chat(http, f"http://{router}:8080", "tiny-sim")
        again = await chat(http, f"http://{router}:8080", "tiny-sim")
    assert again["model"] == "tiny-sim"
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= again["usage"]["prompt_tokens"] - 16, again["usage"]


async def test_a_vllm_serving_runs_as_planned(
    cluster: Any, kubelet: Kubelet, tmp_path: Path
) -> None:
    """``engine.type: vllm``: the vLLM pods the operator plans (the connector copied in by
    the init container, the agent's socket, the derived flags, the events ports) started
    as a kubelet starts them; the router follows their KV events and a repeated chat
    finds its prefix cached."""
    from kvmarina.engine.weights import export_preset

    if kubelet.vllm_python is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run vLLM pods (make test makes .venv-vllm)")
        pytest.skip("no vLLM here (make vllm)")
    export_preset("small", "float32", tmp_path / "models" / "small-hf")
    pool = json.loads(json.dumps(POOL))
    pool["spec"]["hashing"] = {"blockSize": 32}
    await cluster.create(pool)
    doc = serving(
        "vl",
        {"name": "small-vllm", "pvc": "models", "path": "small-hf", "dtype": "float32",
         "maxModelLen": 2048},
        engine={"type": "vllm", "maxBatchSize": 4, "args": ["--enforce-eager"]},
    )  # fmt: skip
    await cluster.create(doc)
    await ready(cluster, kubelet, "vl", timeout=280)
    (router,) = kubelet.pod_ips("default", "router")
    url = f"http://{router}:8080"
    async with aiohttp.ClientSession() as http:
        await chat(http, url, "small-vllm")
        again = await chat(http, url, "small-vllm")
        async with http.get(url + "/metrics") as r:
            metrics = await r.text()
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= again["usage"]["prompt_tokens"] - 64, again["usage"]
    connected = r"kvmarina_router_engine_events_connected\{[^}]*\} 1"
    assert len(re.findall(connected, metrics)) == 2, metrics[-2000:]
