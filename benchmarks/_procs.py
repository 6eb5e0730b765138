"""Processes and a raw HTTP client shared by the router benchmarks (``router.py``,
``router_replay.py``): simulated engines, kvmarina routers, the SGLang router."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmarina.local.sglang import command as sglang_command

REPO = Path(__file__).resolve().parent.parent
IDENT = "sim@v1|simulated|tp0of1"
PY = sys.executable


# -- processes ----------------------------------------------------------------------------
def pinned(cpu: int | None) -> list[str]:
    if cpu is None or not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(cpu)]


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, cmd: list[str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO
        )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[str]) -> None:
        p.kill()
        p.wait()
        self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)


def start_sims(
    procs: Procs, n: int, cpu: int | None, **opts: Any
) -> tuple[subprocess.Popen[str], list[str], list[str]]:
    cmd = [
        *pinned(cpu),
        PY,
        "-m",
        "kvmarina.cli",
        "engine",
        "--simulate",
        "--port",
        "0",
        "--replicas",
        str(n),
        "--node",
        "node",
        "--model-identity",
        IDENT,
    ]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    p = procs.start(cmd)
    assert p.stdout is not None
    info = json.loads(p.stdout.readline())
    return p, info["simulated_engines"], info["nodes"]


def start_router(
    procs: Procs,
    urls: list[str],
    nodes: list[str],
    cpu: int | None,
    policy: str,
    tmp: Path,
    events: bool = True,
    **routing: Any,
) -> tuple[subprocess.Popen[str], str]:
    """A kvmarina router over ``urls``; ``events``: follow each simulated engine's block
    events (it acts as its node's agent), else place from the router's own record."""
    doc = {
        "model": "sim",
        "model_identity": IDENT,
        "serving": "bench",
        "namespace": "bench",
        "routing": {"policy": policy, **routing},
        "limits": {"max_inflight": 4096, "max_queue": 8192},
        "pods": [
            {"name": f"p{i}", "url": u, "node": n, **({"agent_url": u} if events else {})}
            for i, (u, n) in enumerate(zip(urls, nodes, strict=True))
        ],
    }
    cfg = tmp / f"router-{policy}-{time.monotonic_ns()}.json"
    cfg.write_text(json.dumps(doc))
    p = procs.start(
        [
            *pinned(cpu),
            PY,
            "-m",
            "kvmarina.cli",
            "router",
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
    )
    assert p.stdout is not None
    return p, p.stdout.readline().split()[-1]


def start_sglang(
    procs: Procs, urls: list[str], cpu: int | None
) -> tuple[subprocess.Popen[str], str] | None:
    cmd = sglang_command(urls)
    if cmd is None:
        return None
    return procs.start([*pinned(cpu), *cmd[0]]), cmd[1]


async def wait_ready(url: str, timeout: float = 60.0) -> None:
    """Until a completion through ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    body = json.dumps({"model": "sim", "prompt": "ready?", "max_tokens": 1}).encode()
    while True:
        try:
            conn = await RawConn.open(url)
            status, _ = await conn.post("/v1/completions", body)
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready")
        await asyncio.sleep(0.2)


# -- a small keep-alive HTTP/1.1 client (aiohttp's client would be the bottleneck) --------
class RawConn:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> RawConn:
        hostport = url.split("://", 1)[1].rstrip("/")
        host, port = hostport.rsplit(":", 1)
        r, w = await asyncio.open_connection(host, int(port))
        return cls(r, w, hostport)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {
            k.strip().lower(): v.strip()
            for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
        }
        if "content-length" in hdrs:
            return status, await self.reader.readexactly(int(hdrs["content-length"]))
        out = b""
        while True:  # chunked
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                await self.reader.readline()
                return status, out
            out += await self.reader.readexactly(size)
            await self.reader.readline()

    def close(self) -> None:
        self.writer.close()
