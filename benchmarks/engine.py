"""The reference engine (preset ``small``, CPU): prefix reuse across processes, decode speed.

* ``ttft_cold_ms`` / ``ttft_warm_ms``: time to first token of a 4,096-token prompt
  on engine B, cold vs with its first 3,584 tokens cached by engine A (another
  process on the same agent). Target: ``warm_over_cold <= 0.25``.
* ``decode_tps_b1`` / ``decode_tps_b8``: decode tokens/s with the paged KV cache
  (block tables over pool pages, the engine's real path), beside
  ``baseline_decode_tps_*``: the same model (one model, shared) with a plain contiguous
  KV cache. ``decode_ratio_b*`` = paged / contiguous. Targets: ``decode_ratio_b1 >= 0.9``,
  ``decode_ratio_b8 >= 0.8``.

How decode is timed, so that a busy machine moves both sides alike: both caches hold
sequences of the same prompt, decode a few warm-up steps untimed, then step in turn
(paged, contiguous, contiguous, paged, ...), each step timed alone; a figure is
``batch / median step time`` and a ratio is the median over rounds of the per-round
ratio of median step times.

Modes (the exit status is ``enforce``'s: 1 when a gated target is missed):
* no flag: every figure, with torch's default threads (``--threads`` to choose); gates
  on ``warm_over_cold``, ``decode_ratio_b1`` and ``decode_ratio_b8``; absolute tokens/s
  are printed, not gated;
* ``--quick`` (for CI: ~2 s of decoding, ~6 s at most on a busy machine, plus imports):
  batch-1 decode only, one torch thread unless ``--threads`` says otherwise; gates on
  ``decode_ratio_b1 >= 0.8`` (below the full target, so a busy machine passes, above
  what a real regression gives); absolute tokens/s are printed, not gated.

Why one thread in ``--quick``: a batch-1 step of this model is a few hundred small ops,
and with two threads on a shared 2-core machine each parallel region waits for a worker
the OS has descheduled; which side hits more of those waits decides the ratio (measured
here under load: 1.0x to 5.5x from one run to the next). With one thread each side pays
for its own work, and the ratio stayed within 0.94-1.08 under the same load.

    python benchmarks/engine.py [--quick] [--threads N] [--steps 96] [--rounds 5]
                                [--prompt 4096] [--cached 3584] [--trials 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Target, enforce, median, report

from kvmarina.agent.client import LocalPool
from kvmarina.engine.batch import StepBatch
from kvmarina.engine.config import ModelConfig, preset
from kvmarina.engine.kvstore import ContiguousStore, KVStore
from kvmarina.engine.model import build_model
from kvmarina.engine.paged import PagedStore
from kvmarina.hashing import HashContract
from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import ProcessSpec, Supervisor, python_cmd
from kvmarina.local.workload import block_text


async def ttft(url: str, prompt: str) -> float:
    import aiohttp  # here: --quick never needs it, and it takes a while to import

    body = {"model": "small", "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        t0 = time.perf_counter()
        async with s.post(url + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    return time.perf_counter() - t0
    raise RuntimeError("no token")


def reuse(prompt_len: int, cached: int, trials: int) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="kvm-engine-bench-"))
    (tmp / "creds.json").write_text(
        json.dumps({"servings": [{"name": "small", "namespace": "default", "token": "t0k3n"}]})
    )
    (tmp / "token").write_text("t0k3n")
    agent_port, e1, e2 = free_ports(3)
    (tmp / "agent.json").write_text(
        json.dumps(
            {
                "node": "n0",
                "socket_path": str(tmp / "a.sock"),
                "http_port": agent_port,
                "device_bytes": 1024 * 2**20,
                "credentials_file": str(tmp / "creds.json"),
            }
        )
    )
    sup = Supervisor(tmp / "run")
    try:
        sup.start(
            ProcessSpec(
                "agent",
                "agent",
                python_cmd("agent", "--config", str(tmp / "agent.json")),
                ready_url=f"http://127.0.0.1:{agent_port}/readyz",
            )
        )
        sup.wait_ready(60)
        for name, port in (("a", e1), ("b", e2)):
            sup.start(
                ProcessSpec(
                    name,
                    "engine",
                    python_cmd(
                        "engine",
                        "--preset",
                        "small",
                        "--model",
                        "small",
                        "--max-model-len",
                        "8192",
                        "--port",
                        str(port),
                        "--agent-socket",
                        str(tmp / "a.sock"),
                        "--credential-file",
                        str(tmp / "token"),
                    ),
                    ready_url=f"http://127.0.0.1:{port}/health",
                )
            )
        sup.wait_ready(120)
        a, b = f"http://127.0.0.1:{e1}", f"http://127.0.0.1:{e2}"
        asyncio.run(ttft(b, "warm up the engine"))
        cold, warm = [], []
        for t in range(trials):
            cold.append(asyncio.run(ttft(b, block_text(5000 + t, prompt_len))))
            shared = block_text(9000 + t, cached)
            asyncio.run(ttft(a, shared + block_text(100 + t, prompt_len - cached)))
            warm.append(asyncio.run(ttft(b, shared + block_text(200 + t, prompt_len - cached))))
        return median(cold), median(warm)
    finally:
        sup.stop_all()


# Targets: paged / contiguous decode tokens/s. Quick runs gate a little lower than full
# ones: a busy machine moves the same-run ratio a few percent, a regression (0.74x
# when issue 24 reopened) moves it more.
RATIO_B1, RATIO_B8, QUICK_RATIO_B1 = 0.9, 0.8, 0.8
WARM_OVER_COLD = 0.25
# Printed, never gated (absolute figures move with the machine's load): the contiguous
# batch-1 figure of issue 24, and RATIO_B1 of it for the paged cache.
ISSUE_CONTIGUOUS_TPS_B1 = 427.0
KINDS = ("paged", "contiguous")
MIN_STEPS = 8  # timed steps a round needs to count


def _store(kind: str, cfg: ModelConfig, pool: LocalPool) -> KVStore:
    if kind == "paged":
        layout = cfg.kv_layout(16)
        identity = cfg.identity("small", "main", 16).canonical()
        return PagedStore(pool, layout, HashContract(16), identity)
    return ContiguousStore(cfg.num_layers)


def decode_pair(
    batch: int, steps: int, rounds: int, warmup: int = 4, budget_s: float | None = None
) -> dict[str, float]:
    """Decode tokens/s of the paged and the contiguous cache, one step of each in turn.

    Returns ``paged``, ``contiguous`` (batch / median step time over every round) and
    ``ratio`` (paged / contiguous: the median over rounds of each round's ratio of
    median step times). With ``budget_s``, the timed steps stop once that many seconds
    have gone (a round cut short counts if it has ``MIN_STEPS``), so a busy machine
    shortens the run instead of stretching it."""
    if steps < MIN_STEPS or rounds < 1:
        raise SystemExit(f"--steps must be at least {MIN_STEPS} and --rounds at least 1")
    cfg = preset("small")
    model = build_model(cfg, seed=0)
    pool = LocalPool(cfg.kv_layout(16).bytes_per_block, 512 * 2**20)
    prompt_len = 256
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    ratios: list[float] = []
    stores = {k: _store(k, cfg, pool) for k in KINDS}
    t_start = time.perf_counter()

    def over(budget: float | None) -> bool:
        return budget is not None and time.perf_counter() - t_start > budget

    for r in range(rounds):
        ids = tuple(range(r * batch + 1, (r + 1) * batch + 1))
        prompt = torch.randint(0, 256, (batch * prompt_len,), generator=gen)
        tokens = torch.randint(0, 256, (warmup + steps, batch), generator=gen)
        first = StepBatch(ids, (0,) * batch, (prompt_len,) * batch)
        for store in stores.values():
            for i in ids:
                store.open(i, [i] * prompt_len, "")
                store.reserve(i, prompt_len + warmup + steps + 1)
            model(prompt, first.positions(), store.attention(first), first.last_rows())
        per: dict[str, list[float]] = {k: [] for k in KINDS}
        for s in range(warmup + steps):
            if over(budget_s) and len(per["paged"]) >= MIN_STEPS:
                break
            # alternate which cache goes first, so neither always follows the other
            for kind in KINDS if s % 2 == 0 else KINDS[::-1]:
                t0 = time.perf_counter()
                b = StepBatch(ids, (prompt_len + s,) * batch, (1,) * batch)
                model(tokens[s], b.positions(), stores[kind].attention(b), b.last_rows())
                if s >= warmup:
                    per[kind].append(time.perf_counter() - t0)
        for store in stores.values():
            for i in ids:
                store.close(i)
        for k in KINDS:
            times[k] += per[k]
        ratios.append(median(per["contiguous"]) / median(per["paged"]))
        if over(budget_s):
            break
    return {
        "paged": batch / median(times["paged"]),
        "contiguous": batch / median(times["contiguous"]),
        "ratio": median(ratios),
        "rounds": len(ratios),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds; batch-1 decode ratio")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--cached", type=int, default=3584)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=None, help="decode rounds (fresh sequences)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 with --quick)"
    )
    args = ap.parse_args()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    if args.quick:
        return quick(args.steps or 48, args.rounds or 5)
    cold, warm = reuse(args.prompt, args.cached, args.trials)
    steps, rounds = args.steps or 96, args.rounds or 5
    b1, b8 = decode_pair(1, steps, rounds), decode_pair(8, steps, rounds)
    result = {
        "ttft_cold_ms": round(cold * 1e3, 1),
        "ttft_warm_ms": round(warm * 1e3, 1),
        "warm_over_cold": round(warm / cold, 3),
        "decode_tps_b1": round(b1["paged"], 1),
        "decode_tps_b8": round(b8["paged"], 1),
        "baseline_decode_tps_b1": round(b1["contiguous"], 1),
        "baseline_decode_tps_b8": round(b8["contiguous"], 1),
        "decode_ratio_b1": round(b1["ratio"], 3),
        "decode_ratio_b8": round(b8["ratio"], 3),
        "threads": torch.get_num_threads(),
        "quick": False,
        "targets": {
            "warm_over_cold": WARM_OVER_COLD,
            "decode_ratio_b1": RATIO_B1,
            "decode_ratio_b8": RATIO_B8,
        },
    }
    report(
        [
            ("figure", "kvmarina (paged, agent)", "baseline"),
            (
                "TTFT 4k prompt, ms",
                f"warm {result['ttft_warm_ms']}",
                f"cold {result['ttft_cold_ms']}",
            ),
            (
                "decode tok/s, batch 1",
                f"{result['decode_tps_b1']} ({result['decode_ratio_b1']}x)",
                f"contiguous {result['baseline_decode_tps_b1']}",
            ),
            (
                "decode tok/s, batch 8",
                f"{result['decode_tps_b8']} ({result['decode_ratio_b8']}x)",
                f"contiguous {result['baseline_decode_tps_b8']}",
            ),
        ],
        result,
    )
    return enforce(
        [
            Target(
                "warm_over_cold (TTFT, cached / cold)",
                warm / cold,
                WARM_OVER_COLD,
                higher_is_better=False,
            ),
            Target("decode_ratio_b1 (paged / contiguous)", b1["ratio"], RATIO_B1),
            Target("decode_ratio_b8 (paged / contiguous)", b8["ratio"], RATIO_B8),
            Target(
                "decode_tps_b1 (paged, tok/s)",
                b1["paged"],
                RATIO_B1 * ISSUE_CONTIGUOUS_TPS_B1,
                gate=False,
            ),
        ]
    )


def quick(steps: int, rounds: int) -> int:
    """Batch-1 decode only: ``rounds`` interleaved rounds, or as many as ~6 s allow."""
    b1 = decode_pair(1, steps, rounds, budget_s=6.0)
    result = {
        "decode_tps_b1": round(b1["paged"], 1),
        "baseline_decode_tps_b1": round(b1["contiguous"], 1),
        "decode_ratio_b1": round(b1["ratio"], 3),
        "rounds": b1["rounds"],
        "threads": torch.get_num_threads(),
        "quick": True,
        "targets": {"decode_ratio_b1": QUICK_RATIO_B1},
    }
    report(
        [
            ("figure", "kvmarina (paged)", "baseline"),
            (
                "decode tok/s, batch 1",
                f"{result['decode_tps_b1']} ({result['decode_ratio_b1']}x)",
                f"contiguous {result['baseline_decode_tps_b1']}",
            ),
        ],
        result,
    )
    return enforce(
        [
            Target("decode_ratio_b1 (paged / contiguous)", b1["ratio"], QUICK_RATIO_B1),
            Target(
                "decode_tps_b1 (paged, tok/s)",
                b1["paged"],
                RATIO_B1 * ISSUE_CONTIGUOUS_TPS_B1,
                gate=False,
            ),
            Target(
                "baseline_decode_tps_b1 (contiguous, tok/s)",
                b1["contiguous"],
                ISSUE_CONTIGUOUS_TPS_B1,
                gate=False,
            ),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
