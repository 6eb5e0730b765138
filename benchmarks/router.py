"""Router benchmarks: decision time, proxy overhead vs the SGLang router, trace replay.

1. decision: hash + index lookup + scoring of an 8k-token prompt, 64 pods, 1M indexed
   blocks. ``decision_p50_us``: a prompt the router has never seen (all 512 blocks
   hashed); ``decision_shared_prefix_p50_us``: 6k tokens seen before + a fresh 2k tail
   (the hash memo serves the prefix); ``hash_only_8k_p50_us``: the contract's hashing
   alone, the floor of a cold decision. Target p50 <= 300 us.
2. proxy: one router process (pinned to one core) in front of simulated engines that
   answer at once; closed-loop load from a raw keep-alive HTTP client. ``proxy_rps`` and
   ``added_latency_p50_ms`` (sequential requests, router vs the engines directly), and
   ``sglang_rps`` through ``sglang-router --policy cache_aware`` pinned the same way.
3. replay: ``../shared/traces/mooncake_synthetic_trace.jsonl`` (each hash_id -> a fixed
   deterministic run of tokens, time compressed) through 8 simulated engines whose KV
   capacity holds ~70% of the distinct blocks: hit rate and TTFT for cache-aware,
   round-robin, least-load and the SGLang router. ``cache-aware`` places requests only
   (no pull hints: comparable with routers that cannot migrate KV); ``cache-aware+pull``
   also sends pull hints, which the simulated engines honour: its ``reuse_rate`` counts
   tokens pulled from a peer as well as local hits (``hit_rate`` counts local hits only).

    python benchmarks/router.py [--trace PATH] [--requests 1500] [--skip-sglang] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, percentile, report

from kvmarina.local.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / ".." / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
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
    **routing: Any,
) -> tuple[subprocess.Popen[str], str]:
    doc = {
        "model": "sim",
        "model_identity": IDENT,
        "serving": "bench",
        "namespace": "bench",
        "routing": {"policy": policy, **routing},
        "limits": {"max_inflight": 4096, "max_queue": 8192},
        "pods": [
            {"name": f"p{i}", "url": u, "node": n, "agent_url": u}
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
    exe = shutil.which("sglang-router") or str(Path(PY).parent / "sglang-router")
    if not Path(exe).exists():
        return None
    port, metrics_port = free_ports(2)
    p = procs.start(
        [
            *pinned(cpu),
            exe,
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *urls,
            "--policy",
            "cache_aware",
            "--prometheus-port",
            str(metrics_port),
            "--log-level",
            "error",
            "--worker-startup-check-interval",
            "1",
        ]
    )
    return p, f"http://127.0.0.1:{port}"


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


# -- 3. trace replay ----------------------------------------------------------------------------
def load_trace(path: Path, n: int, tokens_per_id: int) -> tuple[list[float], list[str], int]:
    """Arrival times (s), prompt texts, distinct hash ids. One byte = one token."""
    if not path.is_file():
        raise SystemExit(f"trace not found: {path} (pass --trace)")
    rows = []
    with path.open() as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    texts: dict[int, str] = {}
    letters = "abcdefghijklmnopqrstuvwxyz "
    prompts = []
    for r in rows:
        parts = []
        for h in r["hash_ids"]:
            if h not in texts:
                texts[h] = "".join(random.Random(h).choices(letters, k=tokens_per_id))
            parts.append(texts[h])
        length = max(1, -(-int(r["input_length"]) * tokens_per_id // 512))
        prompts.append("".join(parts)[:length])
    t0 = rows[0]["timestamp"]
    return [(r["timestamp"] - t0) / 1000.0 for r in rows], prompts, len(texts)


async def replay(url: str, arrivals: list[float], prompts: list[str]) -> tuple[list[float], int]:
    import aiohttp

    ttfts: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        start = time.monotonic() + 0.2

        async def one(at: float, prompt: str) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            body = {"model": "sim", "prompt": prompt, "max_tokens": 2, "stream": True}
            t0 = time.monotonic()
            try:
                async with http.post(f"{url}/v1/completions", json=body) as r:
                    if r.status != 200:
                        errors += 1
                        await r.read()
                        return
                    first = None
                    async for chunk in r.content.iter_any():
                        if first is None and b"data:" in chunk:
                            first = time.monotonic() - t0
                    if first is not None:
                        ttfts.append(first)
            except aiohttp.ClientError:
                errors += 1

        await asyncio.gather(*(one(a, p) for a, p in zip(arrivals, prompts, strict=True)))
    return ttfts, errors


async def engine_hits(urls: list[str]) -> tuple[float, float]:
    """(local hit rate, reuse rate counting blocks pulled from peers) over all engines."""
    import aiohttp

    cached = total = pulled = 0.0
    async with aiohttp.ClientSession() as http:
        for u in urls:
            async with http.get(f"{u}/metrics") as r:
                for line in (await r.text()).splitlines():
                    name, _, value = line.partition(" ")
                    if name == "kvmarina_sim_cached_tokens_total":
                        cached += float(value)
                    elif name == "kvmarina_sim_prompt_tokens_total":
                        total += float(value)
                    elif name == "kvmarina_sim_pulled_tokens_total":
                        pulled += float(value)
    return (cached / total, (cached + pulled) / total) if total else (0.0, 0.0)


async def router_counter(url: str, name: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def bench_replay(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, Any]:
    arrivals, prompts, distinct = load_trace(args.trace, args.requests, args.tokens_per_id)
    speed = arrivals[-1] / args.replay_seconds if arrivals[-1] > 0 else 1.0
    arrivals = [a / speed for a in arrivals]
    blocks_per_id = args.tokens_per_id // 16
    kv_blocks = max(16, int(distinct * blocks_per_id * args.capacity / args.engines))
    out: dict[str, Any] = {
        "replay_requests": len(prompts),
        "replay_seconds": args.replay_seconds,
        "replay_kv_blocks_per_engine": kv_blocks,
        "replay_mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts)),
    }
    policies = [p for p in args.policies.split(",") if p != "sglang" or not args.skip_sglang]
    for policy in policies:
        sims, urls, nodes = start_sims(
            procs,
            args.engines,
            args.engine_cpu,
            kv_blocks=kv_blocks,
            prefill_tps=args.prefill_tps,
            decode_tps=0,
        )
        await wait_ready(urls[0])
        if policy == "sglang":
            started = start_sglang(procs, urls, args.router_cpu)
            if started is None:
                procs.stop(sims)
                continue
            router, url = started
        else:
            router, url = start_router(
                procs,
                urls,
                nodes,
                args.router_cpu,
                policy.removesuffix("+pull"),
                tmp,
                prefill_tokens_per_second=args.prefill_tps,
                pull_hints=policy.endswith("+pull"),
            )
        await wait_ready(url)
        ttfts, errors = await replay(url, arrivals, prompts)
        hit, reuse = await engine_hits(urls)
        key = policy.replace("-", "_").replace("+", "_")
        if policy != "sglang":
            out[f"{key}_pull_hints"] = await router_counter(url, "kvmarina_router_pull_hints_total")
        procs.stop(router)
        procs.stop(sims)
        out[f"{key}_hit_rate"] = round(hit, 4)
        out[f"{key}_reuse_rate"] = round(reuse, 4)
        out[f"{key}_ttft_p50_ms"] = round(median(ttfts) * 1e3, 2) if ttfts else None
        out[f"{key}_ttft_p90_ms"] = round(percentile(ttfts, 90) * 1e3, 2) if ttfts else None
        out[f"{key}_errors"] = errors
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--decision-runs", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=5.0, help="each closed-loop rps run")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=400)
    ap.add_argument("--requests", type=int, default=1500, help="trace rows replayed")
    ap.add_argument("--replay-seconds", type=float, default=20.0)
    ap.add_argument(
        "--tokens-per-id",
        type=int,
        default=64,
        help="tokens per trace hash_id (512 in the trace; scaled down)",
    )
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument(
        "--capacity",
        type=float,
        default=0.7,
        help="KV capacity of all engines as a fraction of the distinct blocks",
    )
    ap.add_argument("--prefill-tps", type=float, default=25000.0)
    ap.add_argument(
        "--policies",
        default="cache-aware,cache-aware+pull,round-robin,least-load,sglang",
        help="'+pull': the router may send pull hints (the simulated engines honour them)",
    )
    ap.add_argument("--router-cpu", type=int, default=1)
    ap.add_argument("--engine-cpu", type=int, default=0)
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--skip-proxy", action="store_true")
    ap.add_argument("--skip-replay", action="store_true")
    args = ap.parse_args()

    result: dict[str, Any] = bench_decision(args.decision_runs)
    procs = Procs()
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            if not args.skip_proxy:
                result.update(asyncio.run(bench_proxy(args, procs, tmp)))
            if not args.skip_replay:
                result.update(asyncio.run(bench_replay(args, procs, tmp)))
    finally:
        procs.stop_all()

    def g(k: str) -> str:
        v = result.get(k)
        return "-" if v is None else str(v)

    targets = {
        "decision_p50_us<=300": (result["decision_p50_us"] <= 300),
    }
    if "added_latency_p50_ms" in result:
        targets["added_latency_p50_ms<=1"] = result["added_latency_p50_ms"] <= 1
    if "sglang_rps" in result and "proxy_rps" in result:
        targets["proxy_rps>=0.5*sglang_rps"] = result["proxy_rps"] >= 0.5 * result["sglang_rps"]
    if result.get("cache_aware_hit_rate") is not None and "sglang_hit_rate" in result:
        targets["hit_rate>=sglang_hit_rate"] = (
            result["cache_aware_hit_rate"] >= result["sglang_hit_rate"]
        )
    ca, rr = result.get("cache_aware_ttft_p50_ms"), result.get("round_robin_ttft_p50_ms")
    if ca is not None and rr is not None:
        targets["ttft_p50<=0.5*round_robin"] = ca <= 0.5 * rr
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
        (
            "hit rate (cache-aware)",
            g("cache_aware_hit_rate"),
            f"sglang {g('sglang_hit_rate')}, rr {g('round_robin_hit_rate')}, "
            f"least-load {g('least_load_hit_rate')}",
        ),
        (
            "ttft p50 ms (cache-aware)",
            g("cache_aware_ttft_p50_ms"),
            f"sglang {g('sglang_ttft_p50_ms')}, rr {g('round_robin_ttft_p50_ms')}, "
            f"least-load {g('least_load_ttft_p50_ms')}",
        ),
        (
            "ttft p90 ms (cache-aware)",
            g("cache_aware_ttft_p90_ms"),
            f"sglang {g('sglang_ttft_p90_ms')}, rr {g('round_robin_ttft_p90_ms')}",
        ),
    ]
    report(rows, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
