"""KVCachePool -> the agent DaemonSet and what it needs (pure: no API calls).

Children live in the operator's namespace and are owned by the (cluster-scoped)
pool: the agent DaemonSet, a headless Service for peer transfers, a ConfigMap
with the agent config (the hashing contract included), the transfer Secret
(a token and, for mutual TLS, the pool's CA and certificate; made once by the
caller and kept), NetworkPolicies, and the Secret of serving credentials. That
Secret is mounted as a directory: each serving adds its own key
(``credential_key``) and removes it when deleted, so the pool's plan states only
that the Secret exists and never touches its data.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import yaml

from kvmarina.operator import naming as n
from kvmarina.operator.components import agent_config, credentials_doc
from kvmarina.operator.netpol import agent_policies
from kvmarina.operator.settings import Settings
from kvmarina.validate import Resource

CONFIG_DIR = "/etc/kvmarina/agent"
CREDS_DIR = "/etc/kvmarina/credentials"
TRANSFER_DIR = "/etc/kvmarina/transfer"
SOCKET_DIR = "/var/run/kvmarina"
#: the user kvmarina's images run as (Dockerfile ``USER``): agents and engines share it
COMPONENT_UID = 65532
#: where engines find the serving's registration token
TOKEN_DIR = "/etc/kvmarina/token"


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


def b64(values: dict[str, str]) -> dict[str, str]:
    """Secret ``data`` (what the API server stores; ``stringData`` is write-only)."""
    return {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}


def unb64(values: dict[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (values or {}).items()}


def credential_key(serving: str, namespace: str) -> str:
    """The serving's key (a file, once mounted) in the pool's credentials Secret."""
    return f"{namespace}.{serving}.yaml"


def credential_entry(serving: str, namespace: str, scope: str, token: str) -> dict[str, str]:
    doc = credentials_doc([(serving, namespace, scope, token)])
    return {credential_key(serving, namespace): yaml.safe_dump(doc, sort_keys=True)}


def plan_pool(
    pool: Resource, uid: str, settings: Settings, transfer: dict[str, str]
) -> list[dict[str, Any]]:
    """``transfer``: the transfer Secret's files (``token``; ``ca.crt``, ``tls.crt``,
    ``tls.key`` for mutual TLS)."""
    spec, name, ns = pool.spec, pool.name, settings.namespace
    owner = owner_ref("KVCachePool", name, uid)
    inst = n.pool_instance(name)
    transfer_port = spec.migration.port if spec.migration.enabled else None
    # The node name comes from the pod (KVMARINA_AGENT_NODE), overriding this value.
    cfg = agent_config(
        spec,
        node="unset",
        socket_path=f"{SOCKET_DIR}/agent.sock",
        credentials_file=CREDS_DIR,
        http_port=spec.agent.http_port,
        token_file=f"{TRANSFER_DIR}/token",
        cert_dir=TRANSFER_DIR if spec.migration.auth == "mtls" else None,
    )
    config = {"agent.yaml": yaml.safe_dump(cfg, sort_keys=True)}
    # Agents read their config and transfer credentials at start: a change of either
    # changes the pod template, which rolls the DaemonSet.
    rollout = hashlib.sha256(json.dumps([config, transfer], sort_keys=True).encode()).hexdigest()
    out = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(n.pool_config_name(name), ns, "agent", inst, owner),
            "data": config,
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": _meta(n.pool_secret_name(name), ns, "agent", inst, owner),
            "data": b64(transfer),
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": _meta(n.pool_credentials_name(name), ns, "agent", inst, owner),
        },
        _headless_service(name, ns, inst, owner, transfer_port, spec.agent.http_port),
        _daemonset(pool, ns, inst, owner, settings, rollout[:16]),
    ]
    if spec.network_policy.enabled:
        meta = _meta(n.agent_name(name), ns, "agent", inst, owner)
        out += agent_policies(
            meta, name, ns, transfer_port, settings.monitoring_namespaces,
            http_port=spec.agent.http_port,
        )  # fmt: skip
    return out


def _headless_service(
    name: str,
    ns: str,
    inst: str,
    owner: dict[str, Any],
    transfer_port: int | None,
    http_port: int,
) -> dict[str, Any]:
    ports = [{"name": "metrics", "port": http_port, "targetPort": "metrics"}]
    if transfer_port is not None:
        ports.append({"name": "transfer", "port": transfer_port, "targetPort": "transfer"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(n.agent_name(name), ns, "agent", inst, owner),
        "spec": {
            "clusterIP": "None",
            "selector": n.selector("agent", inst),
            "publishNotReadyAddresses": False,
            "ports": ports,
        },
    }


def _daemonset(
    pool: Resource, ns: str, inst: str, owner: dict[str, Any], settings: Settings, rollout: str
) -> dict[str, Any]:
    spec = pool.spec
    env = [
        {"name": "KVMARINA_AGENT_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "KVMARINA_AGENT_CONFIG", "value": f"{CONFIG_DIR}/agent.yaml"},
        {"name": "KVMARINA_LOG_LEVEL", "value": spec.agent.log_level},
        {"name": "KVMARINA_LOG_FORMAT", "value": settings.component_log_format},
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
        "ports": [{"name": "metrics", "containerPort": spec.agent.http_port}]
        + (
            [{"name": "transfer", "containerPort": spec.migration.port}]
            if spec.migration.enabled
            else []
        ),
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "resources": spec.agent.resources.model_dump(),
        "securityContext": {
            "runAsUser": COMPONENT_UID,
            "runAsGroup": COMPONENT_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
        },
        "volumeMounts": [
            {"name": "socket", "mountPath": SOCKET_DIR},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "credentials", "mountPath": CREDS_DIR, "readOnly": True},
            {"name": "transfer", "mountPath": TRANSFER_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    # the kubelet makes a missing hostPath directory root's (0755): the socket directory
    # is handed to the components' user, who create and connect to the agent's socket
    socket_dir = {
        "name": "socket-dir",
        "image": spec.agent.image or settings.agent_image,
        "imagePullPolicy": settings.pull_policy,
        "command": ["chown", f"{COMPONENT_UID}:{COMPONENT_UID}", SOCKET_DIR],
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False},
        "volumeMounts": [{"name": "socket", "mountPath": SOCKET_DIR}],
    }
    pod: dict[str, Any] = {
        "initContainers": [socket_dir],
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
            "template": {
                "metadata": {
                    "labels": n.labels("agent", inst),
                    "annotations": {"kvmarina.io/config-hash": rollout},
                },
                "spec": pod,
            },
        },
    }
