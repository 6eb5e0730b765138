"""Router benchmarks: decision time, and proxy overhead against the SGLang router.

1. decision: hash + index lookup + scoring of an 8k-token prompt, 64 pods, 1M indexed
   blocks. ``decision_p50_us``: a prompt the router has never seen (all 512 blocks
   hashed); ``decision_shared_prefix_p50_us``: 6k tokens seen before + a fresh 2k tail
   (the hash memo serves the prefix); ``hash_only_8k_p50_us``: the contract's hashing
   alone, the floor of a cold decision. Target p50 <= 300 us.
2. proxy: one router process (pinned to one core) in front of simulated engines that
   answer at once; closed-loop load from a raw keep-alive HTTP client. ``proxy_rps`` and
   ``added_latency_p50_ms`` (sequential requests, router vs the engines directly), and
   ``sglang_rps`` through ``sglang-router --policy cache_aware`` pinned the same way.
The trace replay (hit rate and TTFT against the SGLang router) is ``router_replay.py``.

    python benchmarks/router.py [--skip-sglang] [--skip-proxy] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, percentile, report
from _procs import IDENT, Procs, RawConn, start_router, start_sglang, start_sims, wait_ready


async def closed_loop(url: str, body: bytes, conns: int, seconds: float) -> float:
    """Requests per second with ``conns`` keep-alive connections for ``seconds``."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        c = await RawConn.open(url)
        try:
            while time.monotonic() < stop:
                status, _ = await c.post("/v1/completions", body)
                if status == 200:
                    done += 1
        finally:
            c.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done / (time.monotonic() - t0)


async def sequential_latency(url: str, body: bytes, n: int) -> list[float]:
    c = await RawConn.open(url)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await c.post("/v1/completions", body)
            out.append(time.perf_counter() - t0)
    finally:
        c.close()
    return out[n // 10 :]


# -- 1. decision ----------------------------------------------------------------------------
def bench_decision(runs: int) -> dict[str, float]:
    from kvmarina.router.config import parse_config
    from kvmarina.router.routing import RoutingCore

    pods = [
        {
            "name": f"p{i}",
            "url": f"http://10.0.{i}.1:8000",
            "node": f"n{i}",
            "agent_url": f"http://10.0.{i}.1:7070",
        }
        for i in range(64)
    ]
    core = RoutingCore(
        parse_config(
            {
                "model": "m",
                "model_identity": IDENT,
                "pods": pods,
                "limits": {"index_max_blocks": 1_100_000},
            }
        )
    )
    core.live_nodes |= {f"n{i}" for i in range(64)}
    rng = random.Random(0)
    for i in range(64):
        core.index.store(f"n{i}", [rng.randbytes(16) for _ in range(1_000_000 // 64)], "device")
    for i, p in enumerate(core.pods.values()):
        p.inflight, p.queued_tokens = i % 5, (i * 997) % 20000
    shared = [rng.randrange(128000) for _ in range(6144)]  # a long shared prefix ...

    def prompt() -> list[int]:  # ... and a fresh 2k-token tail every time
        return shared + [rng.randrange(128000) for _ in range(2048)]

    seen = prompt()
    hs = core.hashes(seen, "tenant")
    for k in range(8):  # 8 nodes hold parts of the prefix, one in host memory
        core.index.store(f"n{k * 8}", hs[: 48 * (k + 1)], "host" if k == 3 else "device")
    cold, shared_tail, hashing = [], [], []
    for _ in range(runs):
        p = [rng.randrange(128000) for _ in range(8192)]
        t0 = time.perf_counter()
        core.decide(p, "tenant")
        cold.append(time.perf_counter() - t0)
        p = prompt()
        t0 = time.perf_counter()
        core.decide(p, "tenant")
        shared_tail.append(time.perf_counter() - t0)
        p = [rng.randrange(128000) for _ in range(8192)]
        t0 = time.perf_counter()
        core.contract.block_hashes(p, IDENT, "tenant")
        hashing.append(time.perf_counter() - t0)
    return {
        "decision_p50_us": round(median(cold) * 1e6, 1),
        "decision_p99_us": round(percentile(cold, 99) * 1e6, 1),
        "decision_shared_prefix_p50_us": round(median(shared_tail) * 1e6, 1),
        "decision_shared_prefix_p99_us": round(percentile(shared_tail, 99) * 1e6, 1),
        "hash_only_8k_p50_us": round(median(hashing) * 1e6, 1),
        "index_blocks": len(core.index),
    }


# -- 2. proxy overhead ------------------------------------------------------------------------
def proxy_bodies(n: int = 64) -> list[bytes]:
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "router", "node", "block"]
    return [
        json.dumps(
            {
                "model": "sim",
                "max_tokens": 1,
                "prompt": " ".join(rng.choice(words) for _ in range(60)),
            }
        ).encode()
        for _ in range(n)
    ]


async def closed_loop_bodies(
    url: str | list[str], bodies: list[bytes], conns: int, seconds: float
) -> float:
    done = 0
    stop = time.monotonic() + seconds
    urls = [url] if isinstance(url, str) else url

    async def worker(i: int) -> None:
        nonlocal done
        c = await RawConn.open(urls[i % len(urls)])
        k = i
        try:
            while time.monotonic() < stop:
                status, _ = await c.post("/v1/completions", bodies[k % len(bodies)])
                k += 1
                done += status == 200
        finally:
            c.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(conns)))
    return done / (time.monotonic() - t0)


async def bench_proxy(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, Any]:
    _, urls, nodes = start_sims(procs, 4, args.engine_cpu, prefill_tps=0, decode_tps=0)
    bodies = proxy_bodies()
    out: dict[str, Any] = {}
    await wait_ready(urls[0])
    out["direct_rps"] = round(await closed_loop_bodies(urls, bodies, args.conns, args.seconds))
    direct = await sequential_latency(urls[0], bodies[0], args.latency_requests)
    router, rurl = start_router(procs, urls, nodes, args.router_cpu, "cache-aware", tmp)
    await wait_ready(rurl)
    out["proxy_rps"] = round(await closed_loop_bodies(rurl, bodies, args.conns, args.seconds))
    via = await sequential_latency(rurl, bodies[0], args.latency_requests)
    procs.stop(router)
    out["direct_latency_p50_ms"] = round(median(direct) * 1e3, 3)
    out["router_latency_p50_ms"] = round(median(via) * 1e3, 3)
    out["added_latency_p50_ms"] = round((median(via) - median(direct)) * 1e3, 3)
    if not args.skip_sglang:
        started = start_sglang(procs, urls, args.router_cpu)
        if started is None:
            out["sglang_error"] = "sglang-router not installed"
        else:
            sgl, surl = started
            await wait_ready(surl)
            out["sglang_rps"] = round(
                await closed_loop_bodies(surl, bodies, args.conns, args.seconds)
            )
            sv = await sequential_latency(surl, bodies[0], args.latency_requests)
            out["sglang_added_latency_p50_ms"] = round((median(sv) - median(direct)) * 1e3, 3)
            procs.stop(sgl)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decision-runs", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=5.0, help="each closed-loop rps run")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=400)
    ap.add_argument("--router-cpu", type=int, default=1)
    ap.add_argument("--engine-cpu", type=int, default=0)
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--skip-proxy", action="store_true")
    args = ap.parse_args()

    result: dict[str, Any] = bench_decision(args.decision_runs)
    procs = Procs()
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            if not args.skip_proxy:
                result.update(asyncio.run(bench_proxy(args, procs, Path(tmpdir))))
    finally:
        procs.stop_all()

    def g(k: str) -> str:
        v = result.get(k)
        return "-" if v is None else str(v)

    targets = {"decision_p50_us<=300": (result["decision_p50_us"] <= 300)}
    if "added_latency_p50_ms" in result:
        targets["added_latency_p50_ms<=1"] = result["added_latency_p50_ms"] <= 1
    if "sglang_rps" in result and "proxy_rps" in result:
        targets["proxy_rps>=0.5*sglang_rps"] = result["proxy_rps"] >= 0.5 * result["sglang_rps"]
    result["targets_met"] = targets
    rows = [
        ("figure", "kvmarina", "baseline (same run)"),
        (
            "decision p50 us (cold 8k)",
            g("decision_p50_us"),
            f"hash only {g('hash_only_8k_p50_us')}",
        ),
        ("decision p50 us (shared prefix)", g("decision_shared_prefix_p50_us"), ""),
        ("proxy rps", g("proxy_rps"), f"sglang {g('sglang_rps')}, direct {g('direct_rps')}"),
        (
            "added latency p50 ms",
            g("added_latency_p50_ms"),
            f"sglang {g('sglang_added_latency_p50_ms')}",
        ),
    ]
    report(rows, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
