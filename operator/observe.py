"""Reading what the operator's children report: agents' ``/stats``, engines' ``/metrics``,
the router's view of vLLM's event streams, and the ready engine pods as router endpoints.

Only the timer's passes read the pods' figures; every pass reads the endpoints (the
router's configuration follows them). The live pod, not the plan, says where each
listens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmarina.operator import naming as n
from kvmarina.operator import status as st
from kvmarina.operator.components import ENGINE_PORT, ROUTER_PORT, Endpoint
from kvmarina.operator.kube import KubeClient
from kvmarina.operator.plan_vllm import EVENTS_PORT_NAME, REPLAY_PORT_NAME
from kvmarina.operator.scrape import Scraper
from kvmarina.operator.settings import Settings
from kvmarina.validate import Resource


def pod_port(pod: dict[str, Any], name: str, default: int) -> int:
    """The pod's container port called ``name``: the live pod, not the plan, says where
    it listens (during a rollout that changes the port, old pods keep the old one)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == name and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return default


def pod_ip(pod: dict[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return str(ip) if ip else None


@dataclass
class Observer:
    """Reads the pods of pools and servings (through ``kube``) and what they serve
    (through ``scrape``)."""

    kube: KubeClient
    settings: Settings
    scrape: Scraper

    async def agents(self, pool: Resource, agents: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-node figures from the agents' ``/stats``, read concurrently."""
        targets = []
        for a in agents:
            node = (a.get("spec") or {}).get("nodeName")
            if not node:
                continue  # not scheduled: counted in nodesDesired, no node to report
            ip = pod_ip(a)
            port = pod_port(a, "metrics", pool.spec.agent.http_port)
            targets.append((a, node, f"http://{ip}:{port}/stats" if ip else None))
        fetched = iter(await self.scrape.fetch_all([u for _, _, u in targets if u]))
        samples = []
        for a, node, url in targets:
            got = next(fetched) if url else None
            samples.append(
                st.AgentSample(
                    node, a["metadata"]["name"], st.pod_ready(a), url,
                    got.body if got else None, got.error if got else None,
                )
            )  # fmt: skip
        return st.pool_figures(samples, pool.spec.memory.page_bytes)

    async def hit_rate(self, engines: list[dict[str, Any]]) -> float | None:
        urls = [
            f"http://{pod_ip(p)}:{pod_port(p, 'http', ENGINE_PORT)}/metrics"
            for p in engines
            if pod_ip(p) and st.pod_ready(p)
        ]
        fetched = await self.scrape.fetch_all(urls)
        return st.prefix_hit_rate([f.body for f in fetched if f.body is not None])

    async def event_streams(self, serving: Resource) -> list[dict[str, Any]]:
        """vLLM engines' KV-event health as the first ready router reports it (every
        replica follows every pod, so one answers for all)."""
        if serving.spec.engine.type != "vllm":
            return []
        ns = serving.namespace or "default"
        routers = await self.kube.list("v1", "Pod", ns, n.selector("router", serving.name))
        for r in routers:
            if pod_ip(r) and st.pod_ready(r):
                url = f"http://{pod_ip(r)}:{pod_port(r, 'http', ROUTER_PORT)}/health"
                (got,) = await self.scrape.fetch_all([url])
                if got.body is not None:
                    return st.event_streams(got.body)
        return []

    async def endpoints(
        self, pool: Resource, pods: list[dict[str, Any]], serving: Resource
    ) -> list[Endpoint]:
        """The ready engine pods as the router sees them, each with its node's agent
        (and a vLLM pod with its KV-event publisher and replay service)."""
        if not any(st.pod_ready(p) for p in pods):
            return []  # no engine to route to yet: the agents' pods are not needed
        agents = await self.kube.list(
            "v1", "Pod", self.settings.namespace, n.selector("agent", n.pool_instance(pool.name))
        )
        agent_by_node = {
            (a.get("spec") or {}).get("nodeName"): f"http://{pod_ip(a)}:"
            f"{pod_port(a, 'metrics', pool.spec.agent.http_port)}"
            for a in agents
            if pod_ip(a)
        }
        vllm = serving.spec.engine.vllm if serving.spec.engine.type == "vllm" else None
        out = []
        for p in pods:
            ip, node = (p.get("status") or {}).get("podIP"), (p.get("spec") or {}).get("nodeName")
            if not ip or not node or not st.pod_ready(p):
                continue
            agent, events, replay = agent_by_node.get(node), None, None
            if vllm is not None:  # the router follows its events (and its node agent's
                agent = agent if vllm.kv_connector else None  # when it reads that pool)
                events = f"tcp://{ip}:{pod_port(p, EVENTS_PORT_NAME, vllm.events_port)}"
                replay = f"tcp://{ip}:{pod_port(p, REPLAY_PORT_NAME, vllm.replay_port)}"
            out.append(
                Endpoint(
                    p["metadata"]["name"],
                    f"http://{ip}:{pod_port(p, 'http', ENGINE_PORT)}",
                    node,
                    agent,
                    events,
                    replay,
                )
            )
        return sorted(out, key=lambda e: e.name)
