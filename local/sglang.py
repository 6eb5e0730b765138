"""The SGLang router (PyPI ``sglang-router``, a Rust binary) as a peer in front of a
local fleet's engines, for the demo and the benchmarks to compare kvmarina's router
with: its cache-aware policy, on loopback, quiet."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import http_ok

#: what ``pip install sglang-router`` puts beside the interpreter
EXECUTABLE = "sglang-router"
READY_S = 60.0


def executable() -> str | None:
    """``sglang-router`` on ``PATH`` or beside this interpreter; ``None`` when absent."""
    found = shutil.which(EXECUTABLE) or str(Path(sys.executable).parent / EXECUTABLE)
    return found if Path(found).exists() else None


def command(urls: list[str]) -> tuple[list[str], str] | None:
    """``sglang-router`` in front of ``urls`` with its cache-aware policy, and its URL;
    ``None`` when it is not installed."""
    exe = executable()
    if exe is None:
        return None
    port, metrics_port = free_ports(2)
    argv = [exe, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
            "--policy", "cache_aware", "--prometheus-port", str(metrics_port),
            "--log-level", "error", "--worker-startup-check-interval", "1"]  # fmt: skip
    return argv, f"http://127.0.0.1:{port}"


@dataclass
class SGLangRouter:
    """A running ``sglang-router``; ``stop`` ends it."""

    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start(urls: list[str], ready_s: float = READY_S) -> SGLangRouter | None:
    """``sglang-router`` in front of ``urls``, once its ``/health`` answers; ``None``
    when it is not installed. ``RuntimeError`` when it exits or never answers."""
    cmd = command(urls)
    if cmd is None:
        return None
    argv, url = cmd
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    router = SGLangRouter(proc, url)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited with {proc.returncode} before it was ready")
        if http_ok(url + "/health"):
            return router
        time.sleep(0.3)
    router.stop()
    raise RuntimeError(f"sglang-router did not answer on {url}/health within {ready_s:.0f} s")
