"""NetworkPolicies for what the operator creates (pure).

* agent: its transfer port only from the pool's own agents; its HTTP port (events,
  stats, metrics) only from kvmarina routers (any namespace), the operator, and the
  monitoring namespaces the operator is told about;
* engine: only from its serving's router, the pool's agents, the operator (its
  /metrics give the serving's prefix hit rate) and monitoring;
* router: open to clients on its port.

Engines and agents also talk over the node-local unix socket, which no policy sees.
A pool's or serving's ``networkPolicy.enabled: false`` turns its policies off.
"""

from __future__ import annotations

from typing import Any

from kvmarina.operator import naming as n
from kvmarina.operator.components import AGENT_HTTP_PORT, ENGINE_PORT, ROUTER_PORT

NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


def _policy(meta: dict[str, Any], pods: dict[str, str], ingress: list[Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": pods},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _in_namespaces(names: tuple[str, ...]) -> list[dict[str, Any]]:
    if not names:
        return []
    sel = {"matchExpressions": [{"key": NAMESPACE_LABEL, "operator": "In", "values": list(names)}]}
    return [{"namespaceSelector": sel}]


def _agents(pool: str, operator_ns: str) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: operator_ns}},
        "podSelector": {"matchLabels": n.selector("agent", n.pool_instance(pool))},
    }


def _operator(operator_ns: str) -> dict[str, Any]:
    """The operator's pods: they read agents' /stats and engines' /metrics for status."""
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: operator_ns}},
        "podSelector": {"matchLabels": n.OPERATOR_SELECTOR},
    }


def agent_policies(
    meta: dict[str, Any],
    pool: str,
    operator_ns: str,
    transfer_port: int | None,
    monitoring: tuple[str, ...],
    http_port: int = AGENT_HTTP_PORT,
) -> list[dict[str, Any]]:
    """``transfer_port``: ``None`` when the pool's migration is off (no port to open)."""
    routers = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {**n.PART_OF, "app.kubernetes.io/component": "router"}},
    }
    return [
        _policy(
            meta,
            n.selector("agent", n.pool_instance(pool)),
            [
                *(
                    [{"from": [_agents(pool, operator_ns)], "ports": [{"port": transfer_port}]}]
                    if transfer_port is not None
                    else []
                ),
                {
                    "from": [routers, _operator(operator_ns), *_in_namespaces(monitoring)],
                    "ports": [{"port": http_port}],
                },
            ],
        )
    ]


def serving_policies(
    engine_meta: dict[str, Any],
    router_meta: dict[str, Any],
    serving: str,
    pool: str,
    operator_ns: str,
    monitoring: tuple[str, ...],
    event_ports: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    """``event_ports``: an engine's own KV-event ports (vLLM's publisher and replay
    service), which only the serving's routers may reach."""
    router_pods = {"podSelector": {"matchLabels": n.selector("router", serving)}}
    rules: list[dict[str, Any]] = [
        {
            "from": [
                router_pods,
                _agents(pool, operator_ns),
                _operator(operator_ns),
                *_in_namespaces(monitoring),
            ],
            "ports": [{"port": ENGINE_PORT}],
        }
    ]
    if event_ports:
        routers = {"podSelector": {"matchLabels": n.selector("router", serving)}}
        rules.append({"from": [routers], "ports": [{"port": p} for p in event_ports]})
    return [
        _policy(engine_meta, n.selector("engine", serving), rules),
        _policy(router_meta, n.selector("router", serving), [{"ports": [{"port": ROUTER_PORT}]}]),
    ]
