"""Shared fixtures: the repo root, a way to run the ``kvmarina`` CLI for real, and the
real operator (kopf) running against kmock's Kubernetes API emulator over HTTP
(``cluster``), which the operator tests and the plan-running harness share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest

REPO = Path(__file__).resolve().parent.parent


#: test files that start vLLM servers (each start takes a core for 15-25 s): one xdist
#: group, so that no two of them run at once
VLLM_GROUP = ("tests/vllm/", "tests/cluster/test_plan_runs.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """For ``pytest -n`` (``make test``, ``--dist loadgroup``): a module's tests run on one
    worker, so its module-scoped fixtures start once, and the modules that start vLLM
    servers all run on the same worker, one after another."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        group = "vllm" if module.startswith(VLLM_GROUP) else module
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def group_members(group: int) -> list[int]:
    """The live processes of a process group (a supervised process and what it started:
    the supervisor starts each in a session of its own)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[2]) == group and stat[0] != "Z":
            out.append(int(d))
    return out


@pytest.fixture(scope="session")
def process_group() -> Callable[[int], list[int]]:
    """``group_members``, for tests of processes the supervisor started."""
    return group_members


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kvmarina.cli ARGS`` in a fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvmarina.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.fixture
def cli():  # type: ignore[no-untyped-def]
    return run_cli


# -------------------------------------------------------------- the operator on the emulator

NS = "kvmarina-system"
API = "/apis/kvmarina.io/v1alpha1"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
_server: dict[str, str] = {}

# The timers' interval is fixed when the handlers module is imported: short for tests.
_saved = os.environ.get("KVMARINA_RESYNC_SECONDS")
os.environ["KVMARINA_RESYNC_SECONDS"] = "1"
from kvmarina.operator import handlers  # noqa: E402

if _saved is None:
    del os.environ["KVMARINA_RESYNC_SECONDS"]
else:
    os.environ["KVMARINA_RESYNC_SECONDS"] = _saved


@kopf.on.login()
def _login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_server["url"])


class Cluster:
    """The emulator's URL, plain HTTP helpers, and an operator that can be restarted."""

    def __init__(self, kmock: Any, url: str) -> None:
        self.kmock, self.url = kmock, url
        self._task: asyncio.Task[Any] | None = None

    async def start(self, **run: Any) -> None:
        """``run``: kopf.operator's scope and peering arguments (default: the whole
        cluster, standalone)."""
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        run = run or {"clusterwide": True, "standalone": True}
        self._task = asyncio.create_task(kopf.operator(settings=settings, **run))
        handlers._reconciler = None

    async def stop(self) -> None:
        """Cancel the operator, as a killed pod would stop (a graceful stop waits 5 s
        for the emulator's own never-ending watch handlers, which kopf counts as its)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(self._task, 10)
        self._task = None
        await handlers.close()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.url + path, json=body) as r,
        ):
            text = await r.text()
            try:
                return r.status, (await r.json(content_type=None)) if text else None
            except ValueError:
                return r.status, text

    async def get(self, path: str) -> Any:
        status, body = await self.call("GET", path)
        return body if status == 200 else None

    async def create(self, doc: dict[str, Any]) -> None:
        ns = doc["metadata"].get("namespace")
        plural = {"KVCachePool": "kvcachepools", "ModelServing": "modelservings"}[doc["kind"]]
        path = f"{API}/namespaces/{ns}/{plural}" if ns else f"{API}/{plural}"
        status, body = await self.call("POST", path, doc)
        assert status < 300, body

    def served(self) -> int:
        return len(list(self.kmock))

    def writes(self, since: int = 0) -> list[str]:
        """Object-changing requests the emulator served (``METHOD path``) after ``since``."""
        out = []
        for r in list(self.kmock)[since:]:
            method = str(getattr(r.method, "value", r.method)).upper()
            if method in ("POST", "PATCH", "PUT", "DELETE"):
                out.append(f"{method} {r.url.path}")
        return out


@pytest.fixture
async def cluster(kmock: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    kmock.resources.load_bundled()
    kmock.resources["kvmarina.io/v1alpha1/kvcachepools"] = {
        "kind": "KVCachePool",
        "namespaced": False,
        "verbs": VERBS,
        "subresources": {"status"},
    }
    kmock.resources["kvmarina.io/v1alpha1/modelservings"] = {
        "kind": "ModelServing",
        "namespaced": True,
        "verbs": VERBS,
        "subresources": {"status"},
    }
    url = str(kmock.url).rstrip("/")
    _server["url"] = url
    monkeypatch.setenv("KVMARINA_KUBE_SERVER", url)
    monkeypatch.setenv("KVMARINA_OPERATOR_NAMESPACE", NS)
    monkeypatch.setenv("KVMARINA_RESYNC_SECONDS", "1")
    monkeypatch.setattr(handlers, "SETTINGS", handlers.Settings.from_env())
    c = Cluster(kmock, url)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
