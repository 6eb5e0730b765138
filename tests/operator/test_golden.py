"""The planners' output, pinned by golden files (``tests/operator/golden/*.yaml``).

A change to a plan shows up as a diff of these files in review. After an intended
change, regenerate them with ``KVMARINA_REGEN_GOLDEN=1 pytest tests/operator/test_golden.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmarina.operator.components import Endpoint
from kvmarina.operator.plan_pool import plan_pool
from kvmarina.operator.plan_serving import plan_serving
from kvmarina.operator.settings import Settings
from kvmarina.validate import Resource, parse_resource

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("KVMARINA_REGEN_GOLDEN") == "1"
SETTINGS = Settings.from_env({"KVMARINA_MONITORING_NAMESPACES": "monitoring"})
TRANSFER = {"token": "TOKEN", "ca.crt": "CA", "tls.crt": "CERT", "tls.key": "KEY"}
PODS = [
    Endpoint("e-0", "http://10.0.1.1:8000", "node-a", "http://10.0.0.1:7470"),
    Endpoint("e-1", "http://10.0.1.2:8000", "node-b", None),
]
VLLM_PODS = [
    Endpoint(
        "v-0", "http://10.0.1.3:8000", "node-a", None, "tcp://10.0.1.3:5557", "tcp://10.0.1.3:5558"
    ),
]


def _example(name: str) -> list[Resource]:
    return [parse_resource(d) for d in yaml.safe_load_all((REPO / "examples" / name).read_text())]


def _cases() -> dict[str, list[dict[str, Any]]]:
    (pool,) = _example("pool.yaml")
    (serving,) = _example("serving.yaml")
    local_pool, local_serving = _example("local.yaml")
    (vllm,) = _example("vllm-serving.yaml")
    vllm_local_pool, vllm_local = _example("vllm-local.yaml")
    scaled = serving.spec.model_copy(
        update={
            "autoscaling": serving.spec.autoscaling.model_copy(
                update={"enabled": True, "max_replicas": 6}
            ),
            "network_policy": serving.spec.network_policy.model_copy(update={"enabled": False}),
        }
    )
    serving_scaled = Resource(
        serving.kind, serving.name, serving.namespace, scaled, serving.metadata
    )
    return {
        "pool-cuda": plan_pool(pool, "uid-pool", SETTINGS, TRANSFER),
        "pool-local": plan_pool(local_pool, "uid-local", SETTINGS, {"token": "TOKEN"}),
        "serving": plan_serving(serving, "uid-s", pool, SETTINGS, "SERVING-TOKEN", PODS),
        "serving-no-pods": plan_serving(local_serving, "uid-t", local_pool, SETTINGS, "T", []),
        "serving-autoscaled": plan_serving(serving_scaled, "uid-s", pool, SETTINGS, "T", PODS),
        # a claim's folder (engines and router mount it), a GPU pool
        "serving-vllm": plan_serving(vllm, "uid-v", pool, SETTINGS, "V", VLLM_PODS),
        # a preset exported by init containers (weights for vLLM, tokenizer for the router)
        "serving-vllm-preset": plan_serving(
            vllm_local, "uid-w", vllm_local_pool, SETTINGS, "W", VLLM_PODS
        ),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_plan_matches_golden(case: str) -> None:
    text = yaml.safe_dump_all(_cases()[case], sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if REGEN or not path.exists():
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        if not REGEN:
            pytest.fail(f"{path} was missing and has been written; check it and commit it")
    assert text == path.read_text(), f"plan {case} changed; KVMARINA_REGEN_GOLDEN=1 to accept"


def test_plans_are_deterministic() -> None:
    assert _cases() == _cases()


def test_every_child_is_labelled_and_owned() -> None:
    for case, manifests in _cases().items():
        for m in manifests:
            meta = m["metadata"]
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "kvmarina-operator", case
            (owner,) = meta["ownerReferences"]
            assert owner["controller"] and owner["uid"].startswith("uid-"), (case, m["kind"])
