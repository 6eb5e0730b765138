"""The operator on the API emulator (``cluster``, tests/conftest.py), and a kubelet that
runs what it plans (``kubelet``): the cluster path, exercised without a cluster."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .kubelet import Kubelet
from .netns import PodNetwork, unavailable


def _vllm_python() -> str | None:
    """vLLM's interpreter (``make vllm``) for pods of a vLLM image; ``None`` without."""
    from kvmarina.local.vllm import vllm_python
    from kvmarina.operator.components import PlanError

    try:
        return vllm_python(Path(__file__).resolve().parents[2])
    except PlanError:
        return None


@pytest.fixture
async def kubelet(cluster: Any, tmp_path: Path) -> AsyncIterator[Kubelet]:
    why = unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the plan-running harness: {why}")
        pytest.skip(f"the plan-running harness cannot run here: {why}")
    network = PodNetwork()
    network.setup()
    k = Kubelet(cluster.url, tmp_path / "kubelet", network, ["node-a", "node-b"],
                claims={"models": tmp_path / "models"}, vllm_python=_vllm_python())  # fmt: skip
    k.start()
    try:
        yield k
    finally:
        await k.stop()
        network.teardown()
