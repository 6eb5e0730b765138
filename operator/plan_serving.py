"""ModelServing -> engines, router and what they need (pure: no API calls).

Children live in the serving's namespace, owned by it: the registration token
Secret (mounted into the engines; also listed in the pool's credentials), the
engine Deployment and Service, the router Deployment, Service and ConfigMap
(the endpoints come from the caller's view of the engine and agent pods), a
PodDisruptionBudget, an HPA when asked, and NetworkPolicies unless turned off.
"""

from __future__ import annotations

import json
from typing import Any

from kvmarina.operator import naming as n
from kvmarina.operator.components import (
    ENGINE_PORT,
    POD_NAME_ENV,
    ROUTER_PORT,
    Endpoint,
    engine_env,
    router_config,
    vllm_connector,
)
from kvmarina.operator.model_volume import MODEL_MOUNT, ModelVolume, model_volume
from kvmarina.operator.netpol import serving_policies
from kvmarina.operator.plan_pool import SOCKET_DIR, TOKEN_DIR, b64, owner_ref
from kvmarina.operator.plan_vllm import connector_init, vllm_container
from kvmarina.operator.settings import Settings
from kvmarina.serving import model_identity
from kvmarina.validate import Resource

ROUTER_DIR = "/etc/kvmarina/router"


def _meta(name: str, ns: str, component: str, inst: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ns,
        "labels": n.labels(component, inst),
        "ownerReferences": [owner],
    }


def plan_serving(
    serving: Resource,
    uid: str,
    pool: Resource,
    settings: Settings,
    token: str,
    endpoints: list[Endpoint],
    block_bytes: int | None = None,
) -> list[dict[str, Any]]:
    name, ns = serving.name, serving.namespace or "default"
    owner = owner_ref("ModelServing", name, uid)
    router_model = _router_model(serving, settings)
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": _meta(n.serving_token_name(name), ns, "engine", name, owner),
            "data": b64({"token": token}),
        },
        _engine_deployment(serving, pool, settings, owner),
        _service(n.engine_name(name), ns, "engine", name, owner, ENGINE_PORT, ENGINE_PORT),
        _router_deployment(serving, settings, owner, router_model),
        _service(n.router_name(name), ns, "router", name, owner, 80, ROUTER_PORT),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(n.engine_name(name), ns, "engine", name, owner),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": n.selector("engine", name)}},
        },
    ]
    if endpoints:
        cfg = router_config(
            name,
            ns,
            serving.spec,
            pool.spec,
            endpoints,
            block_bytes=block_bytes,
            model_dir=router_model.model_dir,
        )
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta(n.router_config_name(name), ns, "router", name, owner),
                "data": {"router.json": json.dumps(cfg, indent=2, sort_keys=True)},
            }
        )
    a = serving.spec.autoscaling
    if a.enabled:
        out.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": _meta(n.engine_name(name), ns, "engine", name, owner),
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": n.engine_name(name),
                    },
                    "minReplicas": a.min_replicas,
                    "maxReplicas": a.max_replicas,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {
                                    "type": "Utilization",
                                    "averageUtilization": a.target_cpu_utilization,
                                },
                            },
                        }
                    ],
                },
            }
        )
    if serving.spec.network_policy.enabled and pool.spec.network_policy.enabled:
        out += serving_policies(
            _meta(n.engine_name(name), ns, "engine", name, owner),
            _meta(n.router_name(name), ns, "router", name, owner),
            name,
            pool.name,
            settings.namespace,
            settings.monitoring_namespaces,
            _event_ports(serving),
        )
    return out


def _event_ports(serving: Resource) -> tuple[int, ...]:
    e = serving.spec.engine
    return (e.vllm.events_port, e.vllm.replay_port) if e.type == "vllm" else ()


def _service(
    svc: str, ns: str, component: str, inst: str, owner: dict[str, Any], port: int, target: int
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc, ns, component, inst, owner),
        "spec": {
            "selector": n.selector(component, inst),
            "ports": [{"name": "http", "port": port, "targetPort": target}],
        },
    }


def _engine_deployment(
    serving: Resource, pool: Resource, settings: Settings, owner: dict[str, Any]
) -> dict[str, Any]:
    s, name, ns = serving.spec, serving.name, serving.namespace or "default"
    vllm = s.engine.type == "vllm"
    model = model_volume(
        s.model,
        folder_needed=vllm,
        export_image=settings.engine_image,
        weights=True,
        pull_policy=settings.pull_policy,
    )
    connector = (
        vllm_connector(
            name, ns, s, pool.spec,
            agent_socket=f"{SOCKET_DIR}/agent.sock", credential_file=f"{TOKEN_DIR}/token",
        )
        if vllm and s.engine.vllm.kv_connector
        else None
    )  # fmt: skip
    container = (
        vllm_container(s, pool.spec, settings, model.model_dir or MODEL_MOUNT, connector)
        if vllm
        else _reference_container(serving, pool, settings, model.model_dir)
    )
    container["volumeMounts"] += model.mounts
    agent_volumes: list[dict[str, Any]] = [
        {
            "name": "agent-socket",
            "hostPath": {"path": f"{settings.socket_host_path}/{pool.name}", "type": "Directory"},
        },
        {"name": "token", "secret": {"secretName": n.serving_token_name(name)}},
    ]
    volumes: list[dict[str, Any]] = []
    init: list[dict[str, Any]] = []
    if vllm:  # its processes share tensors through /dev/shm, whose default is 64 MiB
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        if connector is not None:
            volumes += [*agent_volumes, {"name": "kvmarina-python", "emptyDir": {}}]
            init.append(connector_init(settings))
    else:
        volumes += agent_volumes
    volumes += model.volumes
    init += model.init_containers
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "nodeSelector": dict(pool.spec.node_selector),
        "tolerations": [
            t.model_dump(by_alias=True, exclude_none=True) for t in pool.spec.tolerations
        ],
    }
    if init:
        pod["initContainers"] = init
    if settings.pull_secrets:
        pod["imagePullSecrets"] = [{"name": p} for p in settings.pull_secrets]
    labels = n.labels(
        "engine", name, **{"kvmarina.io/pool": pool.name, "kvmarina.io/engine": s.engine.type}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(n.engine_name(name), ns, "engine", name, owner),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": n.selector("engine", name)},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _reference_container(
    serving: Resource, pool: Resource, settings: Settings, model_dir: str | None
) -> dict[str, Any]:
    s, name, ns = serving.spec, serving.name, serving.namespace or "default"
    env = engine_env(
        name,
        ns,
        s,
        pool.spec,
        agent_socket=f"{SOCKET_DIR}/agent.sock",
        credential_file=f"{TOKEN_DIR}/token",
        model_dir=model_dir,
    )
    env["KVMARINA_ENGINE_LOG_LEVEL"] = settings.component_log_level
    env["KVMARINA_LOG_FORMAT"] = settings.component_log_format
    if s.engine.simulate:  # seeds its hashes as the router does (auto: the folder's)
        env["KVMARINA_ENGINE_MODEL_IDENTITY"] = model_identity(s, pool.spec) or "auto"
    return {
        "name": "engine",
        "image": s.engine.image or settings.engine_image,
        "imagePullPolicy": settings.pull_policy,
        "args": ["engine", "--simulate"] if s.engine.simulate else ["engine", *s.engine.args],
        "env": [
            *({"name": k, "value": v} for k, v in sorted(env.items())),
            {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "resources": s.engine.resources.model_dump(),
        "volumeMounts": [
            {"name": "agent-socket", "mountPath": SOCKET_DIR},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }


def _router_model(serving: Resource, settings: Settings) -> ModelVolume:
    """The model folder the router reads (tokenizer, chat template, ``config.json``):
    the claim's, or the preset's exported without weights for a vLLM serving (the
    reference engine's presets tokenize bytes and need no folder)."""
    return model_volume(
        serving.spec.model,
        folder_needed=serving.spec.engine.type == "vllm",
        export_image=settings.router_image,
        weights=False,
        pull_policy=settings.pull_policy,
    )


def _router_deployment(
    serving: Resource, settings: Settings, owner: dict[str, Any], model: ModelVolume
) -> dict[str, Any]:
    name, ns, r = serving.name, serving.namespace or "default", serving.spec.routing
    container = {
        "name": "router",
        "image": settings.router_image,
        "imagePullPolicy": settings.pull_policy,
        "args": [
            "router",
            "--config",
            f"{ROUTER_DIR}/router.json",
            "--port",
            str(ROUTER_PORT),
            "--log-level",
            settings.component_log_level.upper(),
        ],
        "env": [{"name": "KVMARINA_LOG_FORMAT", "value": settings.component_log_format}],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "volumeMounts": [
            {"name": "config", "mountPath": ROUTER_DIR, "readOnly": True},
            *model.mounts,
        ],
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "runAsUser": 65532,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(n.router_name(name), ns, "router", name, owner),
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": n.selector("router", name)},
            "template": {
                "metadata": {"labels": n.labels("router", name)},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "config",
                            "configMap": {"name": n.router_config_name(name), "optional": True},
                        },
                        *model.volumes,
                    ],
                    **({"initContainers": model.init_containers} if model.init_containers else {}),
                },
            },
        },
    }
