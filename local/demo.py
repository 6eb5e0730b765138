"""``kvmarina demo``: what KV-cache-aware placement buys, on this machine, in a few minutes.

Brings up 2 simulated nodes x 2 engines (real model compute, preset ``small``)
and a router, replays a shared-prefix chat workload (long system prompts,
multi-turn conversations that resend their history) through cache-aware
routing, then round-robin, then the SGLang router (``sglang-router``, its
cache-aware policy, where it is installed) in front of the same engines, the
caches cleared in between; prints a table and writes a PNG of the TTFT
distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kvmarina.local import sglang
from kvmarina.local.progress import Progress
from kvmarina.local.replay import Summary, replay
from kvmarina.local.rundir import run_dir
from kvmarina.local.supervisor import FleetError, Supervisor
from kvmarina.local.up import start
from kvmarina.local.workload import (
    WorkRequest,
    block_text,
    conversations,
    find_trace,
    mooncake_shared,
)
from kvmarina.operator.components import PlanError
from kvmarina.validate import SpecError

POLICIES = ("cache-aware", "round-robin")
#: the SGLang router's row
SGLANG = "sglang"

DEMO_YAML = """\
apiVersion: kvmarina.io/v1alpha1
kind: KVCachePool
metadata: {{name: demo}}
spec:
  hashing: {{blockSize: {block}}}
  memory: {{backend: cpu, device: 256Mi, host: "0", pageSize: 2Mi}}
  migration: {{auth: token}}
---
apiVersion: kvmarina.io/v1alpha1
kind: ModelServing
metadata: {{name: demo, namespace: default}}
spec:
  poolRef: {{name: demo}}
  model: {{name: demo, preset: {preset}, dtype: float32, maxModelLen: 4096}}
  replicas: {replicas}
  budget: {{min: "0", max: 256Mi}}
  engine: {{type: {engine}, maxBatchSize: 8{args}}}
"""


def fleet_yaml(engine: str, preset: str) -> str:
    """The demo's fleet: 2 nodes x 2 reference engines; or 2 vLLM engines, one a node
    (each bound to a core of this 2-core machine: four vLLMs, with their front-end
    processes, fought over the cores and measured contention more than placement), on
    blocks of 32 tokens (vLLM's CPU attention needs a multiple of 32)."""
    if engine == "vllm":
        # eager, as examples/vllm-local.yaml: torch.compile's warm-up doubles a CPU start
        # and buys nothing on this model
        args = ", args: [--enforce-eager]"
        return DEMO_YAML.format(preset=preset, block=32, replicas=2, engine="vllm", args=args)
    return DEMO_YAML.format(preset=preset, block=16, replicas=4, engine="reference", args="")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvmarina demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--engine",
        default="reference",
        choices=["reference", "vllm"],
        help="kvmarina's reference engine (default) or vLLM (needs `make vllm`)",
    )
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--users", type=int, default=24, help="conversations (24)")
    p.add_argument(
        "--turns", type=int, default=6, help="turns of a typical conversation (6; 1 to 10 drawn)"
    )
    p.add_argument(
        "--context",
        type=int,
        default=1000,
        help="tokens of a typical user's own document (1000; 333 to 2000 drawn)",
    )
    p.add_argument("--trace", help="replay this Mooncake trace instead of generated chats")
    p.add_argument("--requests", type=int, default=40, help="trace requests to replay (40)")
    p.add_argument("--chart", default="kvmarina-demo.png", help="PNG of the TTFT distributions")
    p.add_argument("--run-dir", help="run directory (./.kvmarina-demo)")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> list[WorkRequest]:
    if args.trace:
        path = find_trace(args.trace, Path.cwd())
        return mooncake_shared(path, limit=args.requests)
    # Each user has a document of their own under a shared system prompt, and each
    # turn resends the conversation so far: a prefix only the node that served the
    # previous turn holds. That is where placement matters. Users arrive one every
    # 0.3 s, differ in document size and conversation length, and pause ~0.4 s
    # between turns: busy moments come and go, as on a real fleet, and a request
    # sent to a busy engine waits behind its prefills.
    return conversations(
        users=args.users,
        turns=args.turns,
        system_prompts=2,
        system_len=200,
        context_len=args.context,
        turn_len=60,
        reply_len=40,
        start_gap_s=0.3,
        think_s=0.4,
        max_tokens=6,
    )


def pulled_blocks(sup: Supervisor) -> int:
    """Blocks every agent has pulled from its peers so far (their /stats)."""
    total = 0
    for p in sup.procs:
        if p.spec.role != "agent":
            continue
        with urllib.request.urlopen(p.spec.info["url"] + "/stats", timeout=10) as r:
            stats = json.loads(r.read())
        peers = (stats.get("transfer") or {}).get("peers") or {}
        total += sum(int(st.get("blocks", 0)) for st in peers.values())
    return total


def _post(url: str, body: bytes = b"") -> None:
    headers = {"content-type": "application/json"} if body else {}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    urllib.request.urlopen(req, timeout=30).read()


def set_policy(config_path: str, policy: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    cfg["routing"]["policy"] = policy
    Path(config_path).write_text(json.dumps(cfg, indent=2))
    time.sleep(1.6)  # the router re-reads its config file every second


def clear_caches(sup: Supervisor) -> None:
    """Every KV cache of the fleet emptied: the agents', and vLLM's own (its dev-mode
    reset). vLLM publishes the reset's ``AllBlocksCleared`` with its next step, so a
    one-token request follows: else the router kept the last replay's blocks until the
    next policy's first request (and routed that one by them)."""
    for p in sup.procs:
        if p.spec.role == "agent":
            _post(p.spec.info["url"] + "/admin/clear")
        elif p.spec.info.get("engine") == "vllm":
            _post(p.spec.info["url"] + "/reset_prefix_cache")
            model = next(r.spec.info["model"] for r in sup.procs if r.spec.role == "router")
            body = {"model": model, "prompt": "ok", "max_tokens": 1}
            _post(p.spec.info["url"] + "/v1/completions", json.dumps(body).encode())
    time.sleep(0.5)  # let the routers see the 'cleared' events


def warm_up(sup: Supervisor, model: str, work: list[WorkRequest] | None = None) -> None:
    """A short and a long prompt through every engine, then (given ``work``) one
    unmeasured replay of it round-robin: an engine's first prefills of new sizes
    and batch shapes pay one-time costs (allocations, first kernel runs) that
    would otherwise land on whichever policy runs first (the first replay after
    the two prompts alone was up to 2x slower at p50 in about half the runs).
    Every measured replay clears the caches first."""
    prompts = ["warm up", block_text(99_999_999, 1200)]
    for p in sup.procs:
        if p.spec.role != "engine":
            continue
        for prompt in prompts:
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4}).encode()
            req = urllib.request.Request(
                p.spec.info["url"] + "/v1/completions",
                data=body,
                headers={"content-type": "application/json"},
            )
            urllib.request.urlopen(req, timeout=120).read()
    if work:
        router = next(p for p in sup.procs if p.spec.role == "router")
        set_policy(router.spec.info["config"], "round-robin")
        replay_measured(sup, router.spec.info["url"], model, work, "warm-up")


def run_policies(
    sup: Supervisor,
    work: list[WorkRequest],
    policies: tuple[str, ...] = POLICIES,
    peer: sglang.SGLangRouter | None = None,
) -> list[Summary]:
    """Replay ``work`` once per policy on the same fleet, caches cleared in between;
    then through ``peer`` (the SGLang router in front of the same engines), if given."""
    router = next(p for p in sup.procs if p.spec.role == "router")
    url, model, cfg = router.spec.info["url"], router.spec.info["model"], router.spec.info["config"]
    warm_up(sup, model, work)
    out = []
    for policy in policies:
        set_policy(cfg, policy)
        out.append(replay_measured(sup, url, model, work, policy))
    if peer is not None:
        out.append(replay_measured(sup, peer.url, model, work, SGLANG))
    return out


def replay_measured(
    sup: Supervisor, url: str, model: str, work: list[WorkRequest], policy: str
) -> Summary:
    """One replay through ``url`` from cleared caches, with the agents' pulls counted."""
    clear_caches(sup)
    pulled = pulled_blocks(sup)
    bar = Progress(f"{policy:>12}", len(work))
    summary = asyncio.run(
        replay(url, model, work, policy=policy, concurrency=4, progress=_progress(bar))
    )
    summary.migrated_blocks = pulled_blocks(sup) - pulled
    return summary


def _progress(bar: Progress) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        bar.update(done)

    return update


def print_table(rows: list[Summary]) -> None:
    header = (
        f"{'policy':<12} {'TTFT p50':>10} {'TTFT p90':>10} {'hit rate':>9} "
        f"{'cached tok':>11} {'req/s':>7} {'migrations':>10} {'errors':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for s in rows:
        print(
            f"{s.policy:<12} {s.ttft_p50_ms:>8.0f}ms {s.ttft_p90_ms:>8.0f}ms "
            f"{s.hit_rate:>9.0%} {s.cached_tokens:>11} {s.req_per_s:>7.2f} "
            f"{s.migrated_blocks:>10} {s.errors:>6}"
        )
    by = {s.policy: s for s in rows}
    ca = by.get("cache-aware")
    if ca is None:
        return
    print()
    for other, name in (("round-robin", "round-robin"), (SGLANG, "the SGLang router")):
        o = by.get(other)
        if o is not None and o.ttft_p50_ms > 0:
            print(
                f"cache-aware vs {name}: TTFT p50 {ca.ttft_p50_ms / o.ttft_p50_ms:.2f}x, "
                f"p90 {ca.ttft_p90_ms / max(o.ttft_p90_ms, 1e-9):.2f}x, hit rate "
                f"{ca.hit_rate:.0%} vs {o.hit_rate:.0%}."
            )
    print(
        "A hit means the prompt's prefix was already in the KV cache of the node the "
        "request landed on."
    )


def write_chart(rows: list[Summary], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [s.ttfts_ms for s in rows]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(rows) + 1), [s.policy for s in rows])
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("kvmarina demo: TTFT by routing policy (same fleet, same workload)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    rdir = run_dir(args.run_dir or ".kvmarina-demo")
    rdir.mkdir(parents=True, exist_ok=True)
    yaml_path = rdir.parent / (rdir.name + ".yaml")
    yaml_path.write_text(fleet_yaml(args.engine, args.preset))
    engines = "1 vLLM engine" if args.engine == "vllm" else "2 engines"
    print(f"kvmarina demo: 2 nodes x {engines} (preset {args.preset}) + router, from {yaml_path}")
    try:
        sup = start([str(yaml_path)], 2, str(rdir), None, 300 if args.engine == "vllm" else 180)
    except (FleetError, SpecError, PlanError) as exc:
        print(f"kvmarina demo: {exc}", file=sys.stderr)
        return 1
    peer: sglang.SGLangRouter | None = None
    try:
        work = workload(args)
        urls = [p.spec.info["url"] for p in sup.procs if p.spec.role == "engine"]
        try:
            peer = sglang.start(urls)
        except RuntimeError as exc:  # installed, but it would not start
            print(f"kvmarina demo: {exc}", file=sys.stderr)
            return 1
        names = [*POLICIES, "the SGLang router"] if peer else list(POLICIES)
        print(f"replaying {len(work)} requests per policy ({', '.join(names)})")
        if peer is None:
            print("sglang-router is not installed (pip install sglang-router): no SGLang row")
        rows = run_policies(sup, work, peer=peer)
    finally:
        if peer is not None:
            peer.stop()
        sup.stop_all()
    print_table(rows)
    chart = write_chart(rows, args.chart)
    if chart:
        print(f"chart: {chart}")
    print(f"done in {time.perf_counter() - t0:.0f}s; every process stopped")
    return 0
