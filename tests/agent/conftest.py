"""Real agent processes for the agent's tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

TOKENS = {
    "tok-chat": ("chat", "team-a", "namespace"),
    "tok-code": ("code", "team-a", "namespace"),
    "tok-other": ("other", "team-b", "namespace"),
    "tok-private": ("private", "team-a", "none"),
}
LAYOUT_BLOCK_BYTES = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AgentProc:
    proc: subprocess.Popen[str]
    socket: str
    url: str
    config: Path

    def stats(self) -> dict[str, object]:
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


def write_config(tmp: Path, **over: object) -> Path:
    creds = tmp / "credentials.json"
    creds.write_text(
        json.dumps(
            {
                "servings": [
                    {"name": n, "namespace": ns, "scope": sc, "token": t}
                    for t, (n, ns, sc) in TOKENS.items()
                ]
            }
        )
    )
    cfg = {
        "node": "node-a",
        "socket_path": str(tmp / "agent.sock"),
        "http_port": free_port(),
        "device_bytes": 64 * 4096 * 4,
        "host_bytes": 0,
        "page_size": 4096 * 4,
        "credentials_file": str(creds),
        "hashing": {"block_size": 16},
        **over,
    }
    path = tmp / "agent.json"
    path.write_text(json.dumps(cfg))
    return path


@contextmanager
def agent_process(
    tmp: Path, env: dict[str, str] | None = None, **over: object
) -> Iterator[AgentProc]:
    """``env``: variables added to the agent's environment (as a pod spec sets them)."""
    cfg_path = write_config(tmp, **over)
    cfg = json.loads(cfg_path.read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmarina.cli", "agent", "--config", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{cfg['http_port']}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                urllib.request.urlopen(url + "/readyz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield AgentProc(proc, cfg["socket_path"], url, cfg_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    with agent_process(tmp_path) as a:
        yield a
