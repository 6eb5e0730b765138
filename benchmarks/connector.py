"""vLLM with kvmarina's KV connector against vLLM without it, in one run.

A local fleet of one node, two vLLM engines (preset ``small``, each bound to a core) and
the node agent, started twice: with the connector (``engine.vllm.kvConnector: true``) and
without (the baseline). Figures:

* time to first token of a 2k-token prompt on engine B right after engine A computed it
  (with the connector B loads it from the agent; without, B computes it again), median of
  ``--prompts`` different prompts; target: on at most 0.5x off;
* decode tokens/s of one request (a short prompt, ``--decode-tokens`` tokens), median of
  ``--decode-runs``; target: on at least 0.9x off (full blocks are saved to the agent as
  decoding fills them, on the connector's save thread).

Both fleets run at once and their measurements alternate, so the machine's noise falls
on both alike. Exits non-zero when a target is missed.

    python benchmarks/connector.py [--prompts 8] [--decode-tokens 256] [--decode-runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Target, enforce, report

from kvmarina.local.up import start
from kvmarina.local.workload import block_text

FLEET = """\
apiVersion: kvmarina.io/v1alpha1
kind: KVCachePool
metadata: {{name: bench}}
spec:
  hashing: {{blockSize: 32}}
  memory: {{backend: cpu, device: 512Mi}}
  migration: {{auth: token}}
---
apiVersion: kvmarina.io/v1alpha1
kind: ModelServing
metadata: {{name: bench, namespace: default}}
spec:
  poolRef: {{name: bench}}
  model: {{name: bench, preset: small, dtype: float32, maxModelLen: 4096}}
  replicas: 2
  budget: {{max: 256Mi}}
  engine: {{type: vllm, maxBatchSize: 8, vllm: {{kvConnector: {connector}}}}}
"""


def stream(url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the last, tokens) of a streamed completion."""
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({**body, "stream": True, "temperature": 0}).encode(),
        headers={"content-type": "application/json"},
    )
    t0 = time.perf_counter()
    first, tokens = 0.0, 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: {"):
                tokens += 1
                first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, tokens


class Fleet:
    """One local fleet (two vLLM engines and the node agent), connector on or off."""

    def __init__(self, connector: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kvm-conn-"))
        (self.tmp / "fleet.yaml").write_text(FLEET.format(connector=str(connector).lower()))
        self.sup = start([str(self.tmp / "fleet.yaml")], 1, str(self.tmp / "run"), None, 300)
        self.a, self.b = (p.spec.info["url"] for p in self.sup.procs if p.spec.role == "engine")
        self.ttfts: list[float] = []
        self.decode: list[float] = []
        body = {"model": "bench", "max_tokens": 1}
        stream(self.b, {**body, "prompt": block_text(1, 2000)})  # warm both engines' paths
        stream(self.a, {**body, "prompt": block_text(2, 2000)})
        stream(self.b, {**body, "prompt": "hello", "max_tokens": 16})

    def ttft(self, k: int) -> None:
        """A computes a new 2k prompt (2,001 tokens with the BOS), then B gets it."""
        body = {"model": "bench", "max_tokens": 1, "prompt": block_text(1000 + k, 2000)}
        stream(self.a, body)
        self.ttfts.append(stream(self.b, body)[0])

    def decode_rate(self, tokens: int) -> None:
        first, total, n = stream(
            self.b, {"model": "bench", "prompt": block_text(3, 100), "max_tokens": tokens,
                     "ignore_eos": True}
        )  # fmt: skip
        self.decode.append((n - 1) / (total - first))

    def figures(self) -> dict[str, float]:
        return {
            "ttft_ms": statistics.median(self.ttfts) * 1000,
            "decode_tok_s": statistics.median(self.decode),
        }

    def stop(self) -> None:
        self.sup.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure(
    prompts: int, decode_tokens: int, decode_runs: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Both fleets up at once, their measurements interleaved: the machine's noise
    falls on both alike."""
    fleets: list[Fleet] = []
    try:
        fleets += [Fleet(False), Fleet(True)]
        for k in range(prompts):
            for f in fleets:
                f.ttft(k)
        for _ in range(decode_runs):
            for f in fleets:
                f.decode_rate(decode_tokens)
        return fleets[0].figures(), fleets[1].figures()
    finally:
        for f in fleets:
            f.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--decode-runs", type=int, default=3)
    args = ap.parse_args()
    off, on = measure(args.prompts, args.decode_tokens, args.decode_runs)
    ttft_ratio = on["ttft_ms"] / off["ttft_ms"]
    decode_ratio = on["decode_tok_s"] / off["decode_tok_s"]
    report(
        [
            ("figure", "connector on", "off (baseline)"),
            ("TTFT ms, 2k prompt on B after A", f"{on['ttft_ms']:.1f}", f"{off['ttft_ms']:.1f}"),
            ("decode tokens/s", f"{on['decode_tok_s']:.1f}", f"{off['decode_tok_s']:.1f}"),
        ],
        {
            "ttft_on_ms": round(on["ttft_ms"], 2),
            "ttft_off_ms": round(off["ttft_ms"], 2),
            "ttft_on_over_off": round(ttft_ratio, 3),
            "decode_on_tok_s": round(on["decode_tok_s"], 1),
            "decode_off_tok_s": round(off["decode_tok_s"], 1),
            "decode_on_over_off": round(decode_ratio, 3),
            "targets_met": {"ttft<=0.5x": ttft_ratio <= 0.5, "decode>=0.9x": decode_ratio >= 0.9},
        },
    )
    return enforce(
        [
            Target("ttft_on_over_off", ttft_ratio, 0.5, higher_is_better=False),
            Target("decode_on_over_off", decode_ratio, 0.9),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
