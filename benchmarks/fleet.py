"""The demo's replay on the local fleet (real engines), policy by policy, and the SGLang router.

2 simulated nodes x 2 engines (preset ``small``) behind kvmarina's router with
``cache-aware``, ``round-robin`` and ``least-load``, then the SGLang router
(PyPI ``sglang-router``, ``--policy cache_aware``) as a real process in front of
the same engines. Caches are cleared between policies. Targets: cache-aware
``ttft_p50_ms`` <= 0.5 x round-robin's and <= the SGLang router's; ``hit_rate`` >=
the SGLang router's.

``--engine vllm`` runs the same fleet with vLLM engines (``make vllm``), the router
following their own KV events; the round-robin target is then 0.6x (each vLLM keeps
its KV to itself, so no agent shares a prefix between a node's engines).

The workload is the demo's (``kvmarina.local.demo.workload``): generated
conversations where each user has a document of their own under a shared system
prompt, or the Mooncake trace with ``--trace``.

    python benchmarks/fleet.py [--engine reference|vllm] [--users 24] [--turns 6]
                               [--context 1000] [--rounds 3] [--trace PATH --requests 40]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

from kvmarina.local import sglang
from kvmarina.local.demo import fleet_yaml, replay_measured, set_policy, warm_up, workload
from kvmarina.local.replay import Summary
from kvmarina.local.supervisor import Supervisor
from kvmarina.local.up import start
from kvmarina.local.workload import WorkRequest

POLICIES = ("cache-aware", "round-robin", "least-load")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--trace")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--engine", default="reference", choices=["reference", "vllm"], help="engines of the fleet"
    )
    ap.add_argument("--rounds", type=int, default=3, help="replays per policy (medians)")
    return ap.parse_args()


def run_rounds(sup: Supervisor, work: list[WorkRequest], rounds: int) -> dict[str, list[Summary]]:
    """Every policy ``rounds`` times, the order rotated each round so that no policy
    always runs first (or last) on a machine whose load drifts."""
    router = next(p for p in sup.procs if p.spec.role == "router")
    url, model, cfg = router.spec.info["url"], router.spec.info["model"], router.spec.info["config"]
    warm_up(sup, model, work)
    engines = [p.spec.info["url"] for p in sup.procs if p.spec.role == "engine"]
    try:
        started = sglang.start(engines)
    except RuntimeError as exc:  # installed, but it would not start
        raise SystemExit(f"fleet.py: {exc}") from None
    policies = [*POLICIES, "sglang"] if started else list(POLICIES)
    if started is None:
        print("sglang-router not installed: compared with kvmarina's own policies only")
    out: dict[str, list[Summary]] = {p: [] for p in policies}
    try:
        for r in range(rounds):
            for policy in policies[r % len(policies) :] + policies[: r % len(policies)]:
                if policy == "sglang" and started:
                    target = started.url
                else:
                    set_policy(cfg, policy)
                    target = url
                out[policy].append(replay_measured(sup, target, model, work, policy))
    finally:
        if started:
            started.stop()
    return out


def figures(runs: list[Summary]) -> dict[str, object]:
    med = statistics.median
    return {
        "hit_rate": med(s.hit_rate for s in runs),
        "ttft_p50_ms": med(s.ttft_p50_ms for s in runs),
        "ttft_p90_ms": med(s.ttft_p90_ms for s in runs),
        "req_per_s": med(s.req_per_s for s in runs),
        "migrated_blocks": med(s.migrated_blocks for s in runs),
        "errors": sum(s.errors for s in runs),
        "ttft_p50_ms_rounds": [s.ttft_p50_ms for s in runs],
        "hit_rate_rounds": [s.hit_rate for s in runs],
    }


def main() -> int:
    args = parse()
    tmp = Path(tempfile.mkdtemp(prefix="kvm-fleet-"))
    yaml_path = tmp / "fleet.yaml"
    yaml_path.write_text(fleet_yaml(args.engine, args.preset))
    sup = start([str(yaml_path)], 2, str(tmp / "run"), None, 300)
    work = workload(args)
    try:
        runs = run_rounds(sup, work, args.rounds)
    finally:
        sup.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, dict[str, object]] = {
        p.replace("-", "_"): figures(rs) for p, rs in runs.items()
    }
    ca, rr = result["cache_aware"], result["round_robin"]
    # against round-robin: 0.5x with the reference engine (its issue), 0.6x with vLLM's
    # private caches (no agent shares a prefix between a node's engines)
    k = 0.6 if args.engine == "vllm" else 0.5
    targets = {f"ttft_p50<={k}*round_robin": ca["ttft_p50_ms"] <= k * rr["ttft_p50_ms"]}  # type: ignore[operator]
    sg = result.get("sglang")
    if sg is not None:
        targets["ttft_p50<=sglang"] = ca["ttft_p50_ms"] <= sg["ttft_p50_ms"]  # type: ignore[operator]
        targets["hit_rate>=sglang"] = ca["hit_rate"] >= sg["hit_rate"]  # type: ignore[operator]
    report(
        [("policy", "TTFT p50 / p90 ms (median of rounds)", "hit rate, req/s, migrated")]
        + [
            (
                p,
                f"{f['ttft_p50_ms']} / {f['ttft_p90_ms']}",
                f"{f['hit_rate']:.1%}, {f['req_per_s']}, {f['migrated_blocks']}",
            )
            for p, f in result.items()
        ],
        {
            **result,
            "targets_met": targets,
            "engine": args.engine,
            "requests_per_policy": len(work),
            "rounds": args.rounds,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
