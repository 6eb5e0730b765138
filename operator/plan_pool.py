"""KVCachePool -> the agent DaemonSet and what it needs (pure: no API calls).

Children live in the operator's namespace and are owned by the (cluster-scoped)
pool: the agent DaemonSet, a headless Service for peer transfers, a ConfigMap
with the agent config (the hashing contract included), the transfer Secret
(a token, generated once by the caller and kept), and the Secret listing the
pool's serving credentials.
"""

from __future__ import annotations

from typing import Any

import yaml

from kvmarina.operator import naming as n
from kvmarina.operator.components import AGENT_HTTP_PORT, agent_config, credentials_doc
from kvmarina.operator.settings import Settings
from kvmarina.validate import Resource

CONFIG_DIR = "/etc/kvmarina/agent"
CREDS_DIR = "/etc/kvmarina/credentials"
TRANSFER_DIR = "/etc/kvmarina/transfer"
SOCKET_DIR = "/var/run/kvmarina"


def owner_ref(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{n.GROUP}/v1alpha1",
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(
    name: str, ns: str, component: str, instance: str, owner: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ns,
        "labels": n.labels(component, instance),
        "ownerReferences": [owner],
    }


def plan_pool(
    pool: Resource,
    uid: str,
    settings: Settings,
    transfer_token: str,
    servings: list[tuple[str, str, str, str]],
) -> list[dict[str, Any]]:
    """``servings``: (name, namespace, effective scope, token) of the pool's servings."""
    spec, name, ns = pool.spec, pool.name, settings.namespace
    owner = owner_ref("KVCachePool", name, uid)
    inst = n.pool_instance(name)
    # The node name comes from the pod (KVMARINA_AGENT_NODE), overriding this value.
    cfg = agent_config(
        spec,
        node="unset",
        socket_path=f"{SOCKET_DIR}/agent.sock",
        credentials_file=f"{CREDS_DIR}/credentials.yaml",
        token_file=f"{TRANSFER_DIR}/token",
        cert_dir=TRANSFER_DIR if spec.migration.auth == "mtls" else None,
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(n.pool_config_name(name), ns, "agent", inst, owner),
            "data": {"agent.yaml": yaml.safe_dump(cfg, sort_keys=True)},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": _meta(n.pool_secret_name(name), ns, "agent", inst, owner),
            "stringData": {"token": transfer_token},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": _meta(n.pool_credentials_name(name), ns, "agent", inst, owner),
            "stringData": {"credentials.yaml": yaml.safe_dump(credentials_doc(servings))},
        },
        _headless_service(name, ns, inst, owner, spec.migration.port),
        _daemonset(pool, ns, inst, owner, settings),
    ]


def _headless_service(
    name: str, ns: str, inst: str, owner: dict[str, Any], transfer_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(n.agent_name(name), ns, "agent", inst, owner),
        "spec": {
            "clusterIP": "None",
            "selector": n.selector("agent", inst),
            "publishNotReadyAddresses": False,
            "ports": [
                {"name": "metrics", "port": AGENT_HTTP_PORT, "targetPort": "metrics"},
                {"name": "transfer", "port": transfer_port, "targetPort": "transfer"},
            ],
        },
    }


def _daemonset(
    pool: Resource, ns: str, inst: str, owner: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    spec = pool.spec
    env = [
        {"name": "KVMARINA_AGENT_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "KVMARINA_AGENT_CONFIG", "value": f"{CONFIG_DIR}/agent.yaml"},
        {"name": "KVMARINA_LOG_LEVEL", "value": settings.component_log_level},
    ]
    if spec.memory.backend == "cuda":
        # The agent owns every GPU of its node without claiming them from the scheduler.
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
    container = {
        "name": "agent",
        "image": spec.agent.image or settings.agent_image,
        "imagePullPolicy": settings.pull_policy,
        "args": ["agent"],
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": AGENT_HTTP_PORT},
            {"name": "transfer", "containerPort": spec.migration.port},
        ],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "resources": spec.agent.resources.model_dump(),
        "volumeMounts": [
            {"name": "socket", "mountPath": SOCKET_DIR},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "credentials", "mountPath": CREDS_DIR, "readOnly": True},
            {"name": "transfer", "mountPath": TRANSFER_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {
                "name": "socket",
                "hostPath": {
                    "path": f"{settings.socket_host_path}/{pool.name}",
                    "type": "DirectoryOrCreate",
                },
            },
            {"name": "config", "configMap": {"name": n.pool_config_name(pool.name)}},
            {"name": "credentials", "secret": {"secretName": n.pool_credentials_name(pool.name)}},
            {"name": "transfer", "secret": {"secretName": n.pool_secret_name(pool.name)}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations],
    }
    if settings.pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(n.agent_name(pool.name), ns, "agent", inst, owner),
        "spec": {
            "selector": {"matchLabels": n.selector("agent", inst)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {"metadata": {"labels": n.labels("agent", inst)}, "spec": pod},
        },
    }
