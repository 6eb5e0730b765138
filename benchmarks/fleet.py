"""The demo's replay on the local fleet (real engines), policy by policy, and the SGLang router.

2 simulated nodes x 2 engines (preset ``small``) behind kvmarina's router with
``cache-aware``, ``round-robin`` and ``least-load``, then the SGLang router
(PyPI ``sglang-router``, ``--policy cache_aware``) as a real process in front of
the same engines. Caches are cleared between policies. Targets: cache-aware
``ttft_p50_ms`` <= 0.5 x round-robin's and <= the SGLang router's; ``hit_rate`` >=
the SGLang router's.

    python benchmarks/fleet.py [--users 6] [--turns 4] [--trace PATH --requests 60]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

from kvmarina.local.demo import DEMO_YAML, clear_caches, set_policy, warm_up
from kvmarina.local.replay import Summary, replay
from kvmarina.local.up import start
from kvmarina.local.workload import WorkRequest, conversations, find_trace, mooncake

POLICIES = ("cache-aware", "round-robin", "least-load")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sglang(engines: list[str]) -> tuple[subprocess.Popen[bytes], str] | None:
    exe = shutil.which("sglang-router") or str(Path(sys.executable).parent / "sglang-router")
    if not Path(exe).exists():
        return None
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *engines,
            "--policy",
            "cache_aware",
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "error",
            "--worker-startup-check-interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    return None


def workload(args: argparse.Namespace) -> list[WorkRequest]:
    if args.trace:
        return mooncake(
            find_trace(args.trace, Path.cwd()),
            limit=args.requests,
            tokens_per_id=32,
            time_scale=0.2,
        )
    return conversations(
        users=args.users,
        turns=args.turns,
        system_prompts=4,
        system_len=300,
        turn_len=80,
        gap_s=0.3,
        max_tokens=4,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--trace")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvm-fleet-"))
    yaml_path = tmp / "fleet.yaml"
    yaml_path.write_text(DEMO_YAML.format(preset=args.preset))
    sup = start([str(yaml_path)], 2, str(tmp / "run"), None, 180)
    work = workload(args)
    rows: list[Summary] = []
    try:
        router = next(p for p in sup.procs if p.spec.role == "router")
        url, model, cfg = (
            router.spec.info["url"],
            router.spec.info["model"],
            router.spec.info["config"],
        )
        engines = [p.spec.info["url"] for p in sup.procs if p.spec.role == "engine"]
        warm_up(sup, model)
        for policy in POLICIES:
            set_policy(cfg, policy)
            clear_caches(sup)
            rows.append(asyncio.run(replay(url, model, work, policy=policy, concurrency=4)))
        clear_caches(sup)
        started = start_sglang(engines)
        if started is not None:
            proc, sg_url = started
            try:
                rows.append(
                    asyncio.run(replay(sg_url, model, work, policy="sglang", concurrency=4))
                )
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        sup.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, object] = {}
    for s in rows:
        key = s.policy.replace("-", "_")
        result[key] = {
            "hit_rate": s.hit_rate,
            "ttft_p50_ms": s.ttft_p50_ms,
            "ttft_p90_ms": s.ttft_p90_ms,
            "req_per_s": s.req_per_s,
            "errors": s.errors,
        }
    ca, rr = result["cache_aware"], result["round_robin"]
    sg = result.get("sglang")
    targets = {"ttft_p50<=0.5*round_robin": ca["ttft_p50_ms"] <= 0.5 * rr["ttft_p50_ms"]}  # type: ignore[index]
    if isinstance(sg, dict):
        targets["ttft_p50<=sglang"] = ca["ttft_p50_ms"] <= sg["ttft_p50_ms"]  # type: ignore[index]
        targets["hit_rate>=sglang"] = ca["hit_rate"] >= sg["hit_rate"]  # type: ignore[index]
    result["targets_met"] = targets
    result["requests_per_policy"] = len(work)
    report(
        [("policy", "TTFT p50 / p90 ms", "hit rate, req/s")]
        + [
            (s.policy, f"{s.ttft_p50_ms} / {s.ttft_p90_ms}", f"{s.hit_rate:.0%}, {s.req_per_s}")
            for s in rows
        ],
        result,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
