"""Block hashing: a 32k-token prompt into 16-token blocks.

Compares ``HashContract.block_hashes`` (blake2b-128, chained) with a naive
baseline measured in the same run: hashlib sha256 per block with the token ids
packed one by one at Python level. Target: <= 5 ms per 32k-token prompt.

    python benchmarks/hashing.py [--tokens 32768] [--runs 50]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, report, time_runs

from kvmarina.hashing import HashContract

TARGET_MS = 5.0


def naive(tokens: list[int], block: int, seed: bytes) -> list[bytes]:
    out, prev = [], seed
    for i in range(0, len(tokens) - len(tokens) % block, block):
        data = b"".join(struct.pack("<I", t) for t in tokens[i : i + block])
        prev = hashlib.sha256(prev + data).digest()
        out.append(prev)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()

    rng = random.Random(0)
    tokens = [rng.randrange(128000) for _ in range(args.tokens)]
    contract = HashContract(args.block_size)
    ident = "llama@main|L32/H8/D128/float16/B16|tp0of1"
    ours = median(time_runs(lambda: contract.block_hashes(tokens, ident, "tenant"), args.runs))
    seed = contract.seed(ident, "tenant")
    base = median(time_runs(lambda: naive(tokens, args.block_size, seed), max(5, args.runs // 5)))

    ms = ours * 1e3
    result = {
        "tokens_per_s": round(args.tokens / ours),
        "baseline_tokens_per_s": round(args.tokens / base),
        "ms_per_32k_prompt": round(ms * 32768 / args.tokens, 3),
        "speedup": round(base / ours, 2),
        "target_ms": TARGET_MS,
        "meets_target": ms * 32768 / args.tokens <= TARGET_MS,
    }
    report(
        [
            ("figure", "kvmarina", "baseline (sha256, per-token packing)"),
            ("ms per prompt", f"{ms:.3f}", f"{base * 1e3:.3f}"),
            ("tokens/s", f"{result['tokens_per_s']:,}", f"{result['baseline_tokens_per_s']:,}"),
        ],
        result,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
