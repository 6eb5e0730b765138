"""Start real engine processes on loopback for the engine's HTTP tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def engine_process(*args: str, timeout: float = 60) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvmarina.cli", "engine", "--port", str(port), *args]
    cmd = [
        sys.executable,
        "-c",
        "import sys; from kvmarina.engine.serve import main; sys.exit(main(sys.argv[1:]))",
        "--port",
        str(port),
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"engine exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    with engine_process(
        "--no-agent", "--preset", "tiny", "--model", "tiny", "--max-waiting", "64"
    ) as url:
        yield url
