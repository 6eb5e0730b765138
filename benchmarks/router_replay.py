"""Trace replay: the router's placement against the SGLang router, in two engine regimes.

``../shared/traces/mooncake_synthetic_trace.jsonl`` (each hash_id -> a fixed
deterministic run of tokens, arrivals time-compressed) through ``--engines`` simulated
engines, each its own node, whose KV capacity holds ``--capacity`` of the trace's
distinct blocks (LRU), each with one FIFO prefill server (``kvmarina engine
--simulate``). Two regimes, side by side in one run:

* ``first_token``: engines answer at the first token (the request leaves the engine
  when its prefill is done);
* ``decode``: engines then decode the trace's ``output_length`` tokens at
  ``--decode-ms`` per token, batched (a decoding sequence occupies its engine but does
  not queue behind others), and each sequence decoding slows prefill by
  ``--decode-interference`` (a batched step shares the engine with the prefill chunk).

Policies: ``cache-aware`` (kvmarina, following the engines' block events, placing
only: no pull hints, so it is comparable with routers that cannot move KV),
``cache-aware+pull`` (it may also tell an engine to pull a prefix from a peer),
``cache-aware-approx`` (without events: its own record of what it sent where, as the
SGLang router works), ``round-robin``, and ``sglang`` (``sglang-router --policy
cache_aware``). ``replicas``: two cache-aware routers that share nothing behind a
round-robin front, against one behind the same front (``--replicas-regime``). The
front is the replay itself by default (``--front client``: request i goes to replica
i mod 2, as a Kubernetes Service spreads connections in the kernel, at no cost to the
routers' core); ``--front router`` puts a round-robin kvmarina router there instead,
a third process on the routers' core. Two controls as policies: ``replica1+shadow``
(a second replica follows the events but takes no request: what its CPU costs) and
``replica1x2`` (``--front router`` only: the front names one replica twice: what the
front costs). With ``replica1+shadow`` run, the result also gives two replicas' p90
over the shadow's (``replicas2_p90_over_shadow``): the same processes on the same
cores, one deciding or two.

Targets, per regime: cache-aware hit rate >= SGLang's, TTFT p90 <= 0.8x SGLang's, p50
no worse; two replicas within 5 % of one replica's hit rate and p90. Exit code 1 when a
target is missed.

``--repeat N`` runs everything N times, the order rotated each round, and reports
medians (each round's hit rate and p90 too).

The whole trace by default (3,993 requests over 45 s, engines about half busy): the
issue's figures, hit rates of 0.56-0.63, are the whole trace's (its first 1,500 rows
reuse little, a hit rate of 0.245 at best, and leave placement little to win).

    python benchmarks/router_replay.py [--requests 0] [--replay-seconds 45] [--repeat 1] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, percentile, report
from _procs import Procs, start_router, start_sglang, start_sims, wait_ready

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / ".." / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
REGIMES = ("first_token", "decode")
POLICIES = (
    "cache-aware", "cache-aware+pull", "cache-aware-approx", "round-robin", "sglang",
    "replica1", "replicas2", "replica1+shadow", "replica1x2",
)  # fmt: skip


@dataclass(frozen=True)
class Trace:
    arrivals: list[float]  # seconds from the first request
    prompts: list[str]
    outputs: list[int]  # output tokens of each request (the trace's output_length)
    distinct: int  # distinct hash ids


def load_trace(path: Path, n: int, tokens_per_id: int) -> Trace:
    """The first ``n`` rows (0: all); one character = one token (the byte tokenizer)."""
    if not path.is_file():
        raise SystemExit(f"trace not found: {path} (pass --trace)")
    rows = []
    with path.open() as f:
        for line in f:
            rows.append(json.loads(line))
            if n and len(rows) >= n:
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
    return Trace(
        [(r["timestamp"] - t0) / 1000.0 for r in rows],
        prompts,
        [max(1, int(r.get("output_length", 1))) for r in rows],
        len(texts),
    )


async def replay(
    urls: list[str], trace: Trace, speed: float, decode: bool
) -> tuple[list[float], int]:
    """Every request at its (compressed) arrival time, streamed, each on a connection
    of its own, the ``urls`` taken in turn (round-robin); TTFTs and errors.

    A fresh connection per request: on a reused one, ``sglang-router`` 0.3.2 sends a
    streamed answer's headers and then its first chunk in two segments without
    TCP_NODELAY, so the chunk waits for the client's delayed ACK of the headers:
    every first token through it came at 43.9 ms or later (idle, simulated engine,
    median; 0.4 ms on a new connection, whose first segments are ACKed at once). That
    is a transport quirk, not placement, and it would count against SGLang's p50."""
    import aiohttp

    ttfts: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        start = time.monotonic() + 0.2

        async def one(url: str, at: float, prompt: str, out: int) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + at / speed - time.monotonic()))
            body = {"model": "sim", "prompt": prompt, "max_tokens": out if decode else 2}
            body["stream"] = True
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

        rows = zip(trace.arrivals, trace.prompts, trace.outputs, strict=True)
        await asyncio.gather(
            *(one(urls[i % len(urls)], a, p, o) for i, (a, p, o) in enumerate(rows))
        )
    return ttfts, errors


async def metric_sums(urls: list[str], names: tuple[str, ...]) -> dict[str, float]:
    """Each of ``names`` (unlabelled Prometheus samples) summed over the ``urls``."""
    import aiohttp

    sums = dict.fromkeys(names, 0.0)
    async with aiohttp.ClientSession() as http:
        for u in urls:
            async with http.get(f"{u}/metrics") as r:
                for line in (await r.text()).splitlines():
                    name, _, value = line.partition(" ")
                    if name in sums:
                        sums[name] += float(value)
    return sums


async def engine_hits(urls: list[str]) -> float:
    """Prompt tokens found cached, over all engines."""
    cached, total = "kvmarina_sim_cached_tokens_total", "kvmarina_sim_prompt_tokens_total"
    sums = await metric_sums(urls, (cached, total))
    return sums[cached] / sums[total] if sums[total] else 0.0


async def router_moves(urls: list[str]) -> int:
    """Requests the kvmarina routers at ``urls`` took back from a herded pod."""
    moves = "kvmarina_router_moves_total"
    return int((await metric_sums(urls, (moves,)))[moves])


async def start_replicas(
    args: argparse.Namespace,
    procs: Procs,
    tmp: Path,
    urls: list[str],
    nodes: list[str],
    policy: str,
    routing: dict[str, Any],
    started: list[Any],
) -> tuple[list[str], list[str]]:
    """The cache-aware replicas of a ``replica*`` policy (each in ``started``), ready:
    the URLs the replay takes in turn (the replicas' own with ``--front client``, or one
    round-robin kvmarina router's in front of them with ``--front router``), and the
    replicas' own."""
    inner = []
    n = 1 if policy in ("replica1", "replica1x2") else 2
    for _ in range(n):
        p, u = start_router(
            procs, urls, nodes, args.router_cpu, "cache-aware", tmp,
            replicas=n, pull_hints=False, **routing,
        )  # fmt: skip
        started.append(p)
        inner.append(u)
    for u in inner:
        await wait_ready(u)
    replicas = list(inner)
    if policy == "replica1+shadow":  # a second replica that follows the events
        inner = inner[:1]  # and takes no request: the CPU it costs, no decisions
    if policy == "replica1x2":  # the front with two entries for the same replica
        inner = [inner[0], inner[0]]
    if args.front == "client":
        return inner, replicas
    names = [f"router-{i}" for i in range(len(inner))]
    p, url = start_router(procs, inner, names, args.router_cpu, "round-robin", tmp, events=False)
    started.append(p)
    await wait_ready(url)
    return [url], replicas


async def run_policy(
    args: argparse.Namespace, procs: Procs, tmp: Path, trace: Trace, regime: str, policy: str
) -> dict[str, Any] | None:
    """One fresh fleet, one router set-up, one replay; ``None`` when SGLang is absent."""
    decode = regime == "decode"
    blocks_per_id = args.tokens_per_id // 16
    sims, urls, nodes = start_sims(
        procs,
        args.engines,
        args.engine_cpu,
        kv_blocks=max(16, int(trace.distinct * blocks_per_id * args.capacity / args.engines)),
        prefill_tps=args.prefill_tps,
        decode_tps=1000.0 / args.decode_ms if decode else 0,
        decode_interference=args.decode_interference if decode else 0,
    )
    started = []
    try:
        await wait_ready(urls[0])
        routing: dict[str, Any] = {"prefill_tokens_per_second": args.prefill_tps}
        if args.weights:
            routing["weights"] = json.loads(args.weights)
        deciders: list[str]  # the kvmarina routers that decide (their moves are counted)
        if policy == "sglang":
            s = start_sglang(procs, urls, args.router_cpu)
            if s is None:
                return None
            started.append(s[0])
            await wait_ready(s[1])
            targets, deciders = [s[1]], []  # SGLang's router moves nothing
        elif policy.startswith("replica"):
            targets, deciders = await start_replicas(
                args, procs, tmp, urls, nodes, policy, routing, started
            )
        else:
            p, url = start_router(
                procs,
                urls,
                nodes,
                args.router_cpu,
                policy.removesuffix("-approx").removesuffix("+pull"),
                tmp,
                events=not policy.endswith("-approx"),
                pull_hints=policy.endswith("+pull"),
                **routing,
            )
            started.append(p)
            await wait_ready(url)
            targets = deciders = [url]
        speed = trace.arrivals[-1] / args.replay_seconds if trace.arrivals[-1] > 0 else 1.0
        ttfts, errors = await replay(targets, trace, speed, decode)
        hit = await engine_hits(urls)
        moves = await router_moves(deciders)
    finally:
        for p in started:
            procs.stop(p)
        procs.stop(sims)
    return {
        "hit_rate": round(hit, 4),
        "ttft_p50_ms": round(median(ttfts) * 1e3, 1) if ttfts else None,
        "ttft_p90_ms": round(percentile(ttfts, 90) * 1e3, 1) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 1) if ttfts else None,
        "errors": errors,
        "moves": moves,
    }


def of_rounds(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures, or the median of each over several rounds (with each
    round's hit rate and p90 beside them)."""
    if len(outs) == 1:
        return outs[0]
    out: dict[str, Any] = {}
    for k in ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"):
        xs = [o[k] for o in outs if o[k] is not None]
        out[k] = round(median(xs), 4 if k == "hit_rate" else 1) if xs else None
    out["errors"] = sum(o["errors"] for o in outs)
    out["moves"] = sum(o["moves"] for o in outs)
    out["hit_rate_rounds"] = [o["hit_rate"] for o in outs]
    out["ttft_p90_ms_rounds"] = [o["ttft_p90_ms"] for o in outs]
    return out


def targets(result: dict[str, Any], regimes: list[str]) -> dict[str, bool]:
    out = {}
    for regime in regimes:
        ca, sg = result.get(f"{regime}_cache_aware"), result.get(f"{regime}_sglang")
        if not ca or not sg or ca["ttft_p90_ms"] is None or sg["ttft_p90_ms"] is None:
            continue
        out[f"{regime}: hit_rate>=sglang"] = ca["hit_rate"] >= sg["hit_rate"]
        out[f"{regime}: ttft_p90<=0.8*sglang"] = ca["ttft_p90_ms"] <= 0.8 * sg["ttft_p90_ms"]
        out[f"{regime}: ttft_p50<=sglang"] = ca["ttft_p50_ms"] <= sg["ttft_p50_ms"]
    one, two = result.get("replica1"), result.get("replicas2")
    if one and two and one["ttft_p90_ms"] and two["ttft_p90_ms"]:
        out["replicas: hit_rate>=0.95*one"] = two["hit_rate"] >= 0.95 * one["hit_rate"]
        out["replicas: ttft_p90<=1.05*one"] = two["ttft_p90_ms"] <= 1.05 * one["ttft_p90_ms"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument(
        "--requests", type=int, default=0, help="trace rows replayed (0, the default: all)"
    )
    ap.add_argument("--replay-seconds", type=float, default=45.0)
    ap.add_argument(
        "--tokens-per-id", type=int, default=64, help="tokens per hash_id (512 in the trace)"
    )
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--capacity", type=float, default=0.7, help="KV of all engines / distinct")
    ap.add_argument("--prefill-tps", type=float, default=25000.0)
    ap.add_argument("--decode-ms", type=float, default=20.0, help="per output token (decode)")
    ap.add_argument("--decode-interference", type=float, default=0.01)
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--policies", default="cache-aware,cache-aware-approx,round-robin,sglang")
    ap.add_argument("--replicas-regime", default="decode", help="'' skips the replica runs")
    ap.add_argument(
        "--front",
        choices=("client", "router"),
        default="client",
        help="before the replicas: the replay taking them in turn (client), or a "
        "round-robin kvmarina router (router)",
    )
    ap.add_argument("--weights", default="", help='router weights, JSON: {"duplication": 4}')
    ap.add_argument("--router-cpu", type=int, default=1, help="-1: not pinned")
    ap.add_argument("--engine-cpu", type=int, default=0)
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds of every run, in rotated order (medians)"
    )
    args = ap.parse_args()
    args.router_cpu = None if args.router_cpu < 0 else args.router_cpu  # -1: not pinned
    args.engine_cpu = None if args.engine_cpu < 0 else args.engine_cpu
    if args.requests < 0:
        raise SystemExit(f"--requests {args.requests}: give a row count, or 0 for all")
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: give 1 or more rounds")
    regimes = [r for r in args.regimes.split(",") if r]
    if unknown := set(regimes) - set(REGIMES):
        raise SystemExit(f"unknown regime(s) {sorted(unknown)}; use {', '.join(REGIMES)}")
    policies = [p for p in args.policies.split(",") if p]
    if unknown := set(policies) - set(POLICIES):
        raise SystemExit(f"unknown policy(ies) {sorted(unknown)}; use {', '.join(POLICIES)}")
    if "replica1x2" in policies and args.front != "router":
        raise SystemExit("replica1x2 measures the router front's cost: pass --front router")
    if args.replicas_regime and args.replicas_regime not in REGIMES:
        raise SystemExit(
            f"--replicas-regime {args.replicas_regime}: use {', '.join(REGIMES)}, or '' for none"
        )
    trace = load_trace(args.trace, args.requests, args.tokens_per_id)
    result: dict[str, Any] = {"requests": len(trace.prompts), "seconds": args.replay_seconds}
    procs = Procs()
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            runs = [(r, p) for r in regimes for p in policies]
            if args.replicas_regime:
                runs += [(args.replicas_regime, p) for p in ("replica1", "replicas2")]
            rounds: dict[str, list[dict[str, Any]]] = {}
            for r in range(args.repeat):
                # rotated each round: no run always first (or last) on a drifting machine
                for regime, policy in runs[r % len(runs) :] + runs[: r % len(runs)]:
                    print(f"replaying: {regime} / {policy} (round {r + 1})", file=sys.stderr)
                    out = asyncio.run(run_policy(args, procs, Path(tmpdir), trace, regime, policy))
                    key = policy if policy.startswith("replica") else f"{regime}_{policy}"
                    if out is not None:
                        rounds.setdefault(key.replace("-", "_"), []).append(out)
            result.update({k: of_rounds(v) for k, v in rounds.items()})
    finally:
        procs.stop_all()
    met = targets(result, regimes)
    result["targets_met"] = met
    shadow, two = result.get("replica1+shadow"), result.get("replicas2")
    if shadow and two and shadow["ttft_p90_ms"] and two["ttft_p90_ms"]:
        # not a target: two replicas against one beside an idle second router, the same
        # processes on the same cores (what sharing the router's core costs, set apart)
        result["replicas2_p90_over_shadow"] = round(two["ttft_p90_ms"] / shadow["ttft_p90_ms"], 3)
    rows = [("regime / router", "hit rate", "TTFT p50 / p90 / p99 ms")]
    for key, v in result.items():
        if isinstance(v, dict) and "hit_rate" in v:
            ttft = f"{v['ttft_p50_ms']} / {v['ttft_p90_ms']} / {v['ttft_p99_ms']}"
            tail = f"errors {v['errors']}  moves {v['moves']}"
            rows.append((key, str(v["hit_rate"]), f"{ttft}  {tail}"))
    report(rows, result)
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
