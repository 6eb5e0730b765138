"""The reference engine (preset ``small``, CPU): prefix reuse across processes, decode speed.

* ``ttft_cold_ms`` / ``ttft_warm_ms``: time to first token of a 4,096-token prompt
  on engine B, cold vs with its first 3,584 tokens cached by engine A (another
  process on the same agent). Target: ``warm_over_cold <= 0.25``.
* ``decode_tps_b1`` / ``decode_tps_b8``: decode tokens/s with the paged KV cache
  (block tables over pool pages, the engine's real path), beside
  ``baseline_decode_tps_*``: the same model with a plain contiguous KV cache.
  Target: within 0.8x of the baseline.

    python benchmarks/engine.py [--prompt 4096] [--cached 3584]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, report

from kvmarina.agent.client import LocalPool
from kvmarina.engine.batch import StepBatch
from kvmarina.engine.config import preset
from kvmarina.engine.kvstore import ContiguousStore, KVStore
from kvmarina.engine.model import build_model
from kvmarina.engine.paged import PagedStore
from kvmarina.hashing import HashContract
from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import ProcessSpec, Supervisor, python_cmd
from kvmarina.local.workload import block_text


async def ttft(url: str, prompt: str) -> float:
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


def decode_tps(store_kind: str, batch: int, steps: int) -> float:
    cfg = preset("small")
    model = build_model(cfg, seed=0)
    layout = cfg.kv_layout(16)
    store: KVStore
    if store_kind == "paged":
        pool = LocalPool(layout.bytes_per_block, 512 * 2**20)
        store = PagedStore(
            pool, layout, HashContract(16), cfg.identity("small", "main", 16).canonical()
        )
    else:
        store = ContiguousStore(cfg.num_layers)
    prompt_len = 256
    ids = tuple(range(1, batch + 1))
    for i in ids:
        store.open(i, [i] * prompt_len, "")
        store.reserve(i, prompt_len + steps + 1)
    b = StepBatch(ids, (0,) * batch, (prompt_len,) * batch)
    toks = torch.randint(0, 256, (batch * prompt_len,))
    model(toks, b.positions(), store.attention(b), b.last_rows())
    t0 = time.perf_counter()
    for s in range(steps):
        b = StepBatch(ids, (prompt_len + s,) * batch, (1,) * batch)
        model(torch.randint(0, 256, (batch,)), b.positions(), store.attention(b), b.last_rows())
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--cached", type=int, default=3584)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    cold, warm = reuse(args.prompt, args.cached, args.trials)
    tps = {
        f"{k}_{b}": decode_tps(k, b, args.steps) for k in ("paged", "contiguous") for b in (1, 8)
    }
    result = {
        "ttft_cold_ms": round(cold * 1e3, 1),
        "ttft_warm_ms": round(warm * 1e3, 1),
        "warm_over_cold": round(warm / cold, 3),
        "decode_tps_b1": round(tps["paged_1"], 1),
        "decode_tps_b8": round(tps["paged_8"], 1),
        "baseline_decode_tps_b1": round(tps["contiguous_1"], 1),
        "baseline_decode_tps_b8": round(tps["contiguous_8"], 1),
        "targets": {"warm_over_cold": 0.25, "decode_over_baseline": 0.8},
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
                str(result["decode_tps_b1"]),
                f"contiguous {result['baseline_decode_tps_b1']}",
            ),
            (
                "decode tok/s, batch 8",
                str(result["decode_tps_b8"]),
                f"contiguous {result['baseline_decode_tps_b8']}",
            ),
        ],
        result,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
