"""kvmarina.Cache on the node agent: put in one process, get in another.

A real agent process serves a pool; a *putter* process stores 1 MiB and 64 MiB
float32 tensors with ``cache[key] = t`` (timing each put), and this process, a
different one, reads them back with ``cache[key]`` (timing each get). Baseline,
same run, same processes: ``torch.save`` to a file under /dev/shm in the putter,
``torch.load`` of it here. Medians; every get is checked equal to the tensor put.

Figures: ``get_1mib_us``, ``get_64mib_ms``, ``put_1mib_us``, ``put_64mib_ms`` and
their ``baseline_*``, with speedups (baseline / ours). Target: 64 MiB gets at
least 5x faster than the baseline (``target_met``).

    python benchmarks/tensor_cache.py [--runs-small 30] [--runs-big 7]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import median, report

from kvmarina.agent.cache.tensor_cache import Cache

SIZES = {"1mib": 1 << 20, "64mib": 64 << 20}
TOKEN = "bench-token"


def tensor(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    return torch.rand(SIZES[name] // 4, generator=g)


def start_agent(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = tmp / "creds.json"
    creds.write_text(json.dumps({"servings": [{"name": "bench", "token": TOKEN}]}))
    cfg = {
        "node": "bench",
        "socket_path": str(tmp / "agent.sock"),
        "http_port": port,
        "device_bytes": 512 << 20,
        "page_size": 2 << 20,
        "credentials_file": str(creds),
    }
    (tmp / "agent.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "kvmarina.cli", "agent", "--config", str(tmp / "agent.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return proc, cfg["socket_path"]
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not start") from None
            time.sleep(0.1)


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out[1:]


def putter(sock: str, shm: str, runs: dict[str, int]) -> None:
    """Child process: put each tensor ``runs`` times, save it as many times; print
    the medians as one JSON line, then wait for the parent to finish reading."""
    cache = Cache(capacity="256MiB", namespace="bench", agent=sock, token=TOKEN)
    out = {}
    for name in SIZES:
        t = tensor(name)
        out[f"put_{name}"] = median(timed(lambda t=t, n=name: cache.__setitem__(n, t), runs[name]))
        path = os.path.join(shm, f"{name}.pt")
        out[f"baseline_put_{name}"] = median(
            timed(lambda t=t, p=path: torch.save(t, p), runs[name])
        )
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # keep the session until the getter is done
    cache.close()


def getter(sock: str, shm: str, runs: dict[str, int]) -> dict[str, float]:
    cache = Cache(capacity="256MiB", namespace="bench", agent=sock, token=TOKEN)
    out = {}
    for name in SIZES:
        want = tensor(name)
        assert torch.equal(cache[name], want), f"{name}: the agent returned other bytes"
        path = os.path.join(shm, f"{name}.pt")
        assert torch.equal(torch.load(path), want)
        out[f"get_{name}"] = median(timed(lambda n=name: cache[n], runs[name]))
        out[f"baseline_get_{name}"] = median(timed(lambda p=path: torch.load(p), runs[name]))
    cache.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-small", type=int, default=30)
    ap.add_argument("--runs-big", type=int, default=7)
    ap.add_argument("--putter", nargs=2, metavar=("SOCKET", "SHM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    runs = {"1mib": args.runs_small, "64mib": args.runs_big}
    if args.putter:
        putter(*args.putter, runs)
        return
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(dir="/dev/shm") as shm,
    ):
        agent, sock = start_agent(Path(tmp))
        child = None
        try:
            cmd = [sys.executable, __file__, "--putter", sock, shm]
            cmd += ["--runs-small", str(args.runs_small), "--runs-big", str(args.runs_big)]
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            if not line:
                raise RuntimeError("the putter process failed")
            figures = {**json.loads(line), **getter(sock, shm, runs)}
            child.stdin.write("done\n")
            child.stdin.flush()
            child.wait(30)
        finally:
            if child is not None and child.poll() is None:
                child.kill()
            agent.terminate()
            agent.wait(30)
    summarize(figures)


def summarize(f: dict[str, float]) -> None:
    us, ms = 1e6, 1e3
    result: dict[str, object] = {}
    rows = []
    for op in ("get", "put"):
        for name, unit, scale in (("1mib", "us", us), ("64mib", "ms", ms)):
            ours, base = f[f"{op}_{name}"] * scale, f[f"baseline_{op}_{name}"] * scale
            result[f"{op}_{name}_{unit}"] = round(ours, 1)
            result[f"baseline_{op}_{name}_{unit}"] = round(base, 1)
            result[f"{op}_{name}_speedup"] = round(base / ours, 2)
            rows.append(
                (
                    f"{op} {name} ({unit}, median)",
                    f"{ours:.1f}",
                    f"torch.{'load' if op == 'get' else 'save'} via /dev/shm: {base:.1f}",
                )
            )
    result["target_met"] = bool(result["get_64mib_speedup"] >= 5)  # type: ignore[operator]
    report(rows, result)


if __name__ == "__main__":
    main()
