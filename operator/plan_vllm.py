"""A vLLM engine container (pure: a manifest fragment for ``plan_serving``).

vLLM runs from the serving's image (or the operator's vLLM image for the pool's
backend) as ``python3 -m vllm.entrypoints.openai.api_server`` with the flags
``components.vllm_args`` derives, and declares three ports: ``http`` (the OpenAI API,
probed on ``/health``), ``kv-events`` (its ZMQ publisher) and ``kv-replay`` (its replay
service), which the router's NetworkPolicy admission and the router's config name.
Loading weights can take minutes, so a startup probe holds the liveness probe off.
With kvmarina's KV connector, an init container copies it into the pod (vLLM's image
does not have it), and the node agent's socket and the serving's credential are
mounted as for the reference engine.
"""

from __future__ import annotations

from typing import Any

from kvmarina.operator.components import ENGINE_PORT, VLLM_MODULE, vllm_args, vllm_env
from kvmarina.operator.plan_pool import SOCKET_DIR, TOKEN_DIR
from kvmarina.operator.settings import Settings
from kvmarina.specs import KVCachePoolSpec, ModelServingSpec

EVENTS_PORT_NAME = "kv-events"
REPLAY_PORT_NAME = "kv-replay"


def vllm_image(serving: ModelServingSpec, pool: KVCachePoolSpec, settings: Settings) -> str:
    if serving.engine.image:
        return serving.engine.image
    return settings.vllm_cpu_image if pool.memory.backend == "cpu" else settings.vllm_image


#: where the init container puts kvmarina's connector, on the vLLM container's PYTHONPATH
CONNECTOR_DIR = "/opt/kvmarina/python"


def connector_init(settings: Settings) -> dict[str, Any]:
    """The init container that copies kvmarina's connector into the pod (vLLM's image
    has no kvmarina): ``kvmarina connector install`` from kvmarina's own image."""
    return {
        "name": "kvmarina-connector",
        "image": settings.router_image,
        "imagePullPolicy": settings.pull_policy,
        "args": ["connector", "install", "--into", CONNECTOR_DIR],
        "volumeMounts": [{"name": "kvmarina-python", "mountPath": CONNECTOR_DIR}],
    }


def vllm_container(
    serving: ModelServingSpec,
    pool: KVCachePoolSpec,
    settings: Settings,
    model_dir: str,
    connector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``connector``: ``components.vllm_connector``'s config when the serving uses it
    (the agent socket and the credential are mounted as for the reference engine)."""
    level = settings.component_log_level
    e = serving.engine
    env = vllm_env(level)
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if connector is not None:
        env["PYTHONPATH"] = CONNECTOR_DIR
        mounts += [
            {"name": "kvmarina-python", "mountPath": CONNECTOR_DIR, "readOnly": True},
            {"name": "agent-socket", "mountPath": SOCKET_DIR},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
        ]

    def health(period: int, failures: int = 3) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": period,
            "failureThreshold": failures,
        }

    return {
        "name": "engine",
        "image": vllm_image(serving, pool, settings),
        "imagePullPolicy": settings.pull_policy,
        "command": ["python3", "-m", VLLM_MODULE],
        "args": vllm_args(
            serving,
            pool,
            model_dir=model_dir,
            port=ENGINE_PORT,
            log_level=level,
            connector=connector,
        ),
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [
            {"name": "http", "containerPort": ENGINE_PORT},
            {"name": EVENTS_PORT_NAME, "containerPort": e.vllm.events_port},
            {"name": REPLAY_PORT_NAME, "containerPort": e.vllm.replay_port},
        ],
        "startupProbe": health(10, 180),
        "readinessProbe": health(5),
        "livenessProbe": health(15, 4),
        "resources": e.resources.model_dump(),
        "volumeMounts": mounts,
    }
