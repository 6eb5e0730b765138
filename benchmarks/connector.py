"""vLLM with kvmarina's KV connector against vLLM without it, in one run.

A local fleet of one node, two vLLM engines (preset ``small``, each bound to a core) and
the node agent, started twice: with the connector (``engine.vllm.kvConnector: true``) and
without (the baseline). Figures:

* time to first token of a 2k-token prompt on engine B right after engine A computed it
  (with the connector B loads it from the agent; without, B computes it again), median of
  ``--prompts`` different prompts; target: on at most 0.5x off;
* decode tokens/s of one request (a short prompt, ``--decode-tokens`` tokens); target:
  on at least 0.9x off (full blocks are saved to the agent as decoding fills them).

    python benchmarks/connector.py [--prompts 8] [--decode-tokens 256]
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
from _common import report

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


def measure(connector: bool, prompts: int, decode_tokens: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="kvm-conn-"))
    (tmp / "fleet.yaml").write_text(FLEET.format(connector=str(connector).lower()))
    sup = start([str(tmp / "fleet.yaml")], 1, str(tmp / "run"), None, 300)
    try:
        a, b = (p.spec.info["url"] for p in sup.procs if p.spec.role == "engine")
        body = {"model": "bench", "max_tokens": 1}
        stream(b, {**body, "prompt": block_text(1, 2000)})  # warm both engines' paths
        stream(a, {**body, "prompt": block_text(2, 2000)})
        ttfts = []
        for k in range(prompts):
            prompt = block_text(1000 + k, 2000)  # 2,001 tokens with the BOS
            stream(a, {**body, "prompt": prompt})
            ttfts.append(stream(b, {**body, "prompt": prompt})[0])
        stream(b, {**body, "prompt": "hello", "max_tokens": 16})
        first, total, tokens = stream(
            b, {**body, "prompt": block_text(3, 100), "max_tokens": decode_tokens,
                "ignore_eos": True}
        )  # fmt: skip
        return {
            "ttft_ms": statistics.median(ttfts) * 1000,
            "decode_tok_s": (tokens - 1) / (total - first),
        }
    finally:
        sup.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=256)
    args = ap.parse_args()
    off = measure(False, args.prompts, args.decode_tokens)
    on = measure(True, args.prompts, args.decode_tokens)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
