"""The real operator (kopf) running against kmock's Kubernetes API emulator over HTTP:
the scenarios of the issue."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from kvmarina.operator import handlers
from kvmarina.operator import status as st
from kvmarina.operator.apply import contains, key_of
from kvmarina.operator.components import Endpoint
from kvmarina.operator.plan_pool import plan_pool
from kvmarina.operator.plan_serving import plan_serving
from kvmarina.operator.settings import Settings
from kvmarina.validate import parse_resource

REPO = Path(__file__).resolve().parents[2]
NS = "kvmarina-system"
API = "/apis/kvmarina.io/v1alpha1"
Cluster = Any  # the ``cluster`` fixture's type (tests/conftest.py)
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


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


# ------------------------------------------------- status figures from real pods


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _process(url: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real ``kvmarina`` process, ready once ``url`` answers 200; stopped after."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmarina.cli", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def answers() -> bool:
            assert proc.returncode is None, f"{args[0]} exited with {proc.returncode}"
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as s, s.get(url) as r:
                    return r.status == 200
            return False

        await wait_for(answers, 60)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def _pod(name: str, ns: str, component: str, instance: str, port: tuple[str, int]) -> Any:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "app.kubernetes.io/component": component,
                "app.kubernetes.io/instance": instance,
            },
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [
                {"name": component, "ports": [{"name": port[0], "containerPort": port[1]}]}
            ],
        },
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _agent_commits_and_looks_up(socket_path: str, token: str) -> None:
    """An engine's part, through the agent's own client: 3 blocks committed and
    released, then one lookup of them plus one unknown block (3 hits, 1 miss)."""
    from kvmarina.agent.client import AgentClient

    client = AgentClient(socket_path, token, 4096).connect()
    try:
        hashes = [bytes([i + 1]) * 16 for i in range(3)]
        slots = client.lease(3)
        client.commit([(p, i, h) for (p, i), h in zip(slots, hashes, strict=True)])
        client.release(hashes)
        assert len(client.lookup([*hashes, b"\xee" * 16])) == 3
    finally:
        client.close()


async def test_status_carries_the_figures_of_the_real_agent_and_engine(
    cluster: Cluster, tmp_path: Path
) -> None:
    from kvmarina.operator.components import agent_config, credentials_doc

    pool_doc, serving_doc = docs()
    http_port, engine_port = _free_port(), _free_port()
    pool_doc["spec"]["memory"] = {"backend": "cpu", "device": "8Mi", "host": "4Mi"}
    pool_doc["spec"]["agent"] = {"httpPort": http_port}
    serving_doc["spec"]["budget"] = {"min": "0", "max": "4Mi"}
    # the agent runs with the config the operator plans for the pool, on loopback
    token = "t" * 32
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps(credentials_doc([("tiny", "default", "namespace", token)])))
    cfg = agent_config(
        parse_resource(pool_doc).spec, node="node-a", socket_path=str(tmp_path / "a.sock"),
        credentials_file=str(creds), http_host="127.0.0.1", http_port=http_port,
    )  # fmt: skip
    (tmp_path / "agent.json").write_text(json.dumps(cfg))
    agent_url = f"http://127.0.0.1:{http_port}"
    engine_url = f"http://127.0.0.1:{engine_port}"
    async with (
        _process(f"{agent_url}/readyz", "agent", "--config", str(tmp_path / "agent.json")) as agent,
        _process(f"{engine_url}/health", "engine", "--simulate", "--port", str(engine_port),
                 "--prefill-tps", "0", "--decode-tps", "0"),
    ):  # fmt: skip
        await asyncio.to_thread(_agent_commits_and_looks_up, cfg["socket_path"], token)
        prompt = "the same long system prompt, shared by every request " * 4
        for _ in range(2):  # the second request finds the first one's blocks
            status, _ = await _post(f"{engine_url}/v1/completions", prompt)
            assert status == 200
        await cluster.create(pool_doc)
        await cluster.create(serving_doc)
        pods = "/api/v1/namespaces/{}/pods"
        await cluster.call("POST", pods.format(NS), _pod("agent-a", NS, "agent", "pool-local",
                                                         ("metrics", http_port)))  # fmt: skip
        await cluster.call("POST", pods.format("default"), _pod("tiny-engine-a", "default",
                                                                "engine", "tiny",
                                                                ("http", engine_port)))  # fmt: skip
        async with aiohttp.ClientSession() as s, s.get(f"{agent_url}/healthz") as r:
            boot = (await r.json())["boot_id"]

        async def pool_figures() -> Any:
            obj = await cluster.get(f"{API}/kvcachepools/local")
            nodes = ((obj or {}).get("status") or {}).get("nodes") or []
            return obj["status"] if nodes and nodes[0].get("blocks") == 3 else None

        pool_st = await wait_for(pool_figures)
        (node,) = pool_st["nodes"]
        assert node["node"] == "node-a" and node["pod"] == "agent-a" and node["ready"] is True
        assert node["device"] == {"capacityBytes": 8 * 2**20, "usedBytes": 2**21, "blocks": 3}
        assert node["host"] == {"capacityBytes": 4 * 2**20, "usedBytes": 0, "blocks": 0}
        assert node["hitRate"] == 0.75 and node["sessions"] == 0
        assert node["index"]["bootId"] == boot and node["index"]["lastEventSeq"] == 1
        assert node["index"]["eventLag"] == 0 and node["index"]["resyncs"] == 0
        assert pool_st["blocks"] == 3 and pool_st["hitRate"] == 0.75
        assert pool_st["servings"] == 1
        assert conditions({"status": pool_st})["Degraded"]["status"] == "False"

        async with aiohttp.ClientSession() as s, s.get(f"{engine_url}/metrics") as r:
            expected = st.prefix_hit_rate([await r.text()])
        assert expected and 0 < expected < 1

        async def serving_rate() -> Any:
            return ((await cluster.get(SERVING)) or {}).get("status", {}).get("prefixHitRate")

        assert await wait_for(serving_rate) == expected

        agent.terminate()  # the agent goes away: its node shows why, the pool is Degraded
        await agent.wait()

        async def unreachable() -> Any:
            obj = await cluster.get(f"{API}/kvcachepools/local")
            node = ((obj or {}).get("status") or {}).get("nodes", [{}])[0]
            return obj if node.get("reason") == "Unreachable" else None

        obj = await wait_for(unreachable)
        node = obj["status"]["nodes"][0]
        assert node["ready"] is False and f"127.0.0.1:{http_port}/stats" in node["message"]
        degraded = conditions(obj)["Degraded"]
        assert degraded["status"] == "True" and "node-a: Unreachable" in degraded["message"]


async def _post(url: str, prompt: str) -> tuple[int, Any]:
    body = {"model": "sim", "prompt": prompt, "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.json()


# ----------------------------------------------------------------- leader election

PEERINGS = "/apis/kopf.dev/v1/clusterkopfpeerings"


async def test_two_replicas_elect_a_leader_through_kopf_peering(cluster: Cluster) -> None:
    """The chart's 2 replicas: each runs with the peering name the chart sets. A replica
    outranked by a live peer announces itself and pauses; when the peer leaves, it
    takes over."""
    from datetime import UTC, datetime

    from kvmarina.operator.main import scope_and_peering

    await cluster.stop()
    cluster.kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = {
        "kind": "ClusterKopfPeering",
        "namespaced": False,
        "verbs": VERBS,
    }
    leader = {"priority": 100, "lifetime": 60, "lastseen": datetime.now(UTC).isoformat()}
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": "kv-kvmarina", "resourceVersion": "1"},
        "status": {"the-other-replica": leader},
    }
    status, body = await cluster.call("POST", PEERINGS, peering)
    assert status < 300, body
    run = scope_and_peering(Settings.from_env({"KVMARINA_OPERATOR_PEERING": "kv-kvmarina"}))
    assert run["standalone"] is False and run["clusterwide"] is True
    await cluster.start(**run)
    pool, _ = docs()
    await cluster.create(pool)

    async def peers() -> Any:
        obj = await cluster.get(f"{PEERINGS}/kv-kvmarina")
        found = set((obj or {}).get("status") or {})
        return found if len(found) == 2 else None

    assert "the-other-replica" in await wait_for(peers)  # this replica announced itself
    await asyncio.sleep(2.0)  # several resync intervals: a paused replica writes nothing
    config = f"/api/v1/namespaces/{NS}/configmaps/kvmarina-pool-local"
    assert await cluster.get(config) is None
    # the leader leaves (kopf withdraws its entry on exit): this replica takes over
    await cluster.call("PATCH", f"{PEERINGS}/kv-kvmarina", {"status": {"the-other-replica": None}})
    assert await wait_for(lambda: cluster.get(config))


def test_timers_first_run_an_interval_after_creation_spread_by_uid() -> None:
    delays = [handlers.first_resync(uid=f"uid-{i}") for i in range(200)]
    interval = handlers.SETTINGS.resync_seconds
    assert all(interval <= d < 2 * interval for d in delays)
    assert handlers.first_resync(uid="uid-7") == delays[7]  # stable for one object
    # objects created together are spread over the second interval, not bunched
    assert len({int(10 * (d - interval) / interval) for d in delays}) == 10


# ----------------------------------------------------------------- a vLLM serving


async def test_a_vllm_serving_plans_vllm_pods_and_reports_their_event_streams(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The operator plans vLLM pods from the pool's contract, names each ready pod's
    event ports in the router's config, and reports per pod how the router follows
    its events (here: a pod whose publisher does not answer)."""
    pool_doc, serving_doc = (
        {**d, "metadata": {**d["metadata"], "resourceVersion": "1", "uid": f"uid-{i}"}}
        for i, d in enumerate(yaml.safe_load_all((REPO / "examples/vllm-local.yaml").read_text()))
    )
    await cluster.create(pool_doc)
    await cluster.create(serving_doc)
    serving_path = f"{API}/namespaces/default/modelservings/small-vllm"
    await settled(cluster, serving_path)
    engine = await wait_for(lambda: cluster.get(f"{DEP}/small-vllm-engine"))
    pod = engine["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"][c["args"].index("--block-size") + 1] == "32"
    assert "--enable-prefix-caching" in c["args"]
    assert json.loads(c["args"][c["args"].index("--kv-events-config") + 1])["endpoint"] == (
        "tcp://*:5557"
    )
    assert [p["name"] for p in c["ports"]] == ["http", "kv-events", "kv-replay"]
    init = {i["name"]: i["args"] for i in pod["initContainers"]}
    assert init["export-model"][:4] == ["model", "export", "--preset", "small"]
    # kvmarina's KV connector: copied into the pod, with the agent's socket and the token
    assert init["kvmarina-connector"][:2] == ["connector", "install"]
    transfer = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
    assert transfer["kv_connector_module_path"] == "kvmarina.connector.vllm"
    assert {m["name"] for m in c["volumeMounts"]} >= {"agent-socket", "token", "kvmarina-python"}
    router_dep = await cluster.get(f"{DEP}/small-vllm-router")
    assert "--no-weights" in router_dep["spec"]["template"]["spec"]["initContainers"][0]["args"]
    policy = await cluster.get(
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/small-vllm-engine"
    )
    assert {"port": 5557} in policy["spec"]["ingress"][1]["ports"]

    # a ready vLLM pod whose publisher does not answer (its HTTP side is a simulated
    # engine), and a real router from the config the operator writes for it
    pods = "/api/v1/namespaces/default/pods"
    silent_events, http_port = _free_port(), _free_port()
    vllm_pod = _pod("small-vllm-engine-a", "default", "engine", "small-vllm", ("http", http_port))
    vllm_pod["spec"]["containers"][0]["ports"] += [
        {"name": "kv-events", "containerPort": silent_events},
        {"name": "kv-replay", "containerPort": _free_port()},
    ]
    await cluster.call("POST", pods, vllm_pod)

    async def router_cfg() -> Any:
        cm = await cluster.get("/api/v1/namespaces/default/configmaps/small-vllm-router-config")
        return cm and json.loads(cm["data"]["router.json"])

    cfg = await wait_for(router_cfg)
    assert cfg["engine"] == "vllm"
    assert cfg["pods"][0]["kv_events"] == f"tcp://127.0.0.1:{silent_events}"
    model_dir = tmp_path / "model"
    from kvmarina.presets import write_preset_folder

    write_preset_folder("small", "float32", model_dir)  # what the router's init container writes
    cfg["tokenizer_dir"] = str(model_dir)
    (tmp_path / "router.json").write_text(json.dumps(cfg))
    router_port = _free_port()
    async with (
        _process(f"http://127.0.0.1:{http_port}/health", "engine", "--simulate", "--port",
                 str(http_port), "--model", "small-vllm"),
        _process(f"http://127.0.0.1:{router_port}/health", "router", "--config",
                 str(tmp_path / "router.json"), "--host", "127.0.0.1", "--port", str(router_port)),
    ):  # fmt: skip
        await cluster.call(
            "POST", pods, _pod("small-vllm-router-a", "default", "router", "small-vllm",
                               ("http", router_port)),
        )  # fmt: skip

        async def reported() -> Any:
            obj = await cluster.get(serving_path)
            streams = ((obj or {}).get("status") or {}).get("eventStreams") or []
            return obj if streams and streams[0]["errors"].get("unreachable") else None

        obj = await wait_for(reported, 30)
    (stream,) = obj["status"]["eventStreams"]
    assert stream["pod"] == "small-vllm-engine-a"
    assert stream["connected"] is False and stream["live"] is False
    degraded = conditions(obj)["Degraded"]
    assert degraded["status"] == "True" and "small-vllm-engine-a" in degraded["message"]
    assert "unreachable" in degraded["message"]
