"""The operator's own settings: environment variables the Helm chart sets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@dataclass(frozen=True, slots=True)
class Settings:
    namespace: str = "kvmarina-system"
    peering: str = ""
    watch_namespaces: tuple[str, ...] = ()
    agent_image: str = "ghcr.io/kvmarina/kvmarina-cuda:0.1.0"
    engine_image: str = "ghcr.io/kvmarina/kvmarina-cuda:0.1.0"
    router_image: str = "ghcr.io/kvmarina/kvmarina-slim:0.1.0"
    # vLLM's own images (a serving's engine.image wins), one per pool backend
    vllm_image: str = "vllm/vllm-openai:v0.32.0"
    vllm_cpu_image: str = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"
    pull_policy: str = "IfNotPresent"
    pull_secrets: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    socket_host_path: str = "/var/run/kvmarina"
    component_log_level: str = "info"
    component_log_format: str = "text"  # text | json (KVMARINA_LOG_FORMAT of the components)
    health_port: int = 8080
    resync_seconds: float = 60.0
    # namespaces (e.g. Prometheus') allowed through the NetworkPolicies to metrics ports
    monitoring_namespaces: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = cls()
        return cls(
            namespace=e.get("KVMARINA_OPERATOR_NAMESPACE", d.namespace),
            peering=e.get("KVMARINA_OPERATOR_PEERING", d.peering),
            watch_namespaces=_list(e.get("KVMARINA_WATCH_NAMESPACES")),
            agent_image=e.get("KVMARINA_AGENT_IMAGE", d.agent_image),
            engine_image=e.get("KVMARINA_ENGINE_IMAGE", d.engine_image),
            router_image=e.get("KVMARINA_ROUTER_IMAGE", d.router_image),
            vllm_image=e.get("KVMARINA_VLLM_IMAGE", d.vllm_image),
            vllm_cpu_image=e.get("KVMARINA_VLLM_CPU_IMAGE", d.vllm_cpu_image),
            pull_policy=e.get("KVMARINA_IMAGE_PULL_POLICY", d.pull_policy),
            pull_secrets=_list(e.get("KVMARINA_IMAGE_PULL_SECRETS")),
            cluster_domain=e.get("KVMARINA_CLUSTER_DOMAIN", d.cluster_domain),
            socket_host_path=e.get("KVMARINA_SOCKET_HOST_PATH", d.socket_host_path),
            component_log_level=e.get("KVMARINA_COMPONENT_LOG_LEVEL", d.component_log_level),
            component_log_format=e.get("KVMARINA_COMPONENT_LOG_FORMAT", d.component_log_format),
            health_port=int(e.get("KVMARINA_HEALTH_PORT", d.health_port)),
            resync_seconds=float(e.get("KVMARINA_RESYNC_SECONDS", d.resync_seconds)),
            monitoring_namespaces=_list(e.get("KVMARINA_MONITORING_NAMESPACES")),
        )
