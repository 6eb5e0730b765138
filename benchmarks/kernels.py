"""Kernel throughput beside same-run baselines.

CPU (always): ``gather_gbps`` — gather 2 MiB blocks into a staging buffer — vs
``memcpy_gbps`` (a torch copy of the same bytes); ``decode_ratio`` — paged
decode attention time / torch SDPA over the same KV made contiguous;
``prefill_ratio`` — a chunked-prefill step (``--chunk`` new tokens over
``--context`` cached, the ``small`` preset's heads) through paged attention /
torch SDPA with the causal mask over the same KV made contiguous.
CUDA (when a GPU is present): the same keys on the device plus ``d2d_gbps``.
Targets: CPU gather >= 50% of memcpy; CUDA gather >= 80% of d2d, decode_ratio <= 1.

    python benchmarks/kernels.py [--blocks 128] [--batch 8] [--context 1024]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median, report, time_runs

from kvmarina.kernels import gather_blocks, paged_attention, paged_decode

BLOCK_BYTES = 2 * 1024 * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: torch.device, n_blocks: int, runs: int) -> dict[str, float]:
    pool = torch.randint(0, 255, (n_blocks * 2, BLOCK_BYTES), dtype=torch.uint8, device=device)
    ids = torch.randperm(n_blocks * 2, device=device)[:n_blocks]
    staging = torch.empty(n_blocks, BLOCK_BYTES, dtype=torch.uint8, device=device)
    src = pool[:n_blocks]
    nbytes = n_blocks * BLOCK_BYTES

    def gather() -> None:
        gather_blocks(pool, ids, out=staging)
        sync(device)

    def memcpy() -> None:
        staging.copy_(src)
        sync(device)

    g = nbytes / median(time_runs(gather, runs)) / 1e9
    m = nbytes / median(time_runs(memcpy, runs)) / 1e9
    out = {
        "gather_gbps": round(g, 2),
        "memcpy_gbps": round(m, 2),
        "gather_over_memcpy": round(g / m, 3),
    }
    if device.type == "cuda":
        out["d2d_gbps"] = out["memcpy_gbps"]
    return out


def decode(
    device: torch.device, batch: int, context: int, runs: int, dtype: torch.dtype
) -> dict[str, float]:
    h_q, h_kv, d, b = 32, 8, 128, 16
    nblk = batch * context // b
    gen = torch.Generator(device="cpu").manual_seed(0)
    kc = torch.randn(nblk, b, h_kv, d, generator=gen).to(device, dtype)
    vc = torch.randn(nblk, b, h_kv, d, generator=gen).to(device, dtype)
    tables = torch.randperm(nblk, generator=gen).view(batch, -1).to(device, torch.int32)
    ctx = torch.full((batch,), context, device=device)
    q = torch.randn(batch, h_q, d, generator=gen).to(device, dtype)
    # the same KV, contiguous per sequence: [batch, heads, context, d]
    k_contig = (
        kc[tables.long()]
        .reshape(batch, context, h_kv, d)
        .repeat_interleave(4, 2)
        .transpose(1, 2)
        .contiguous()
    )
    v_contig = (
        vc[tables.long()]
        .reshape(batch, context, h_kv, d)
        .repeat_interleave(4, 2)
        .transpose(1, 2)
        .contiguous()
    )

    def paged() -> None:
        paged_decode(q, kc, vc, tables, ctx)
        sync(device)

    def sdpa() -> None:
        scaled_dot_product_attention(q[:, :, None, :], k_contig, v_contig)
        sync(device)

    tp, ts = median(time_runs(paged, runs)), median(time_runs(sdpa, runs))
    return {
        "decode_paged_ms": round(tp * 1e3, 3),
        "decode_sdpa_ms": round(ts * 1e3, 3),
        "decode_ratio": round(tp / ts, 3),
    }


def prefill(chunk: int, context: int, runs: int) -> dict[str, float]:
    h_q, h_kv, d, b = 8, 2, 32, 16  # preset small, the one the CPU demo runs
    ctx = context + chunk
    nblk = -(-ctx // b)
    gen = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(nblk * 2, b, h_kv, d, generator=gen) for _ in range(2))
    table = torch.randperm(nblk * 2, generator=gen)[:nblk].to(torch.int32)[None]
    q = torch.randn(chunk, h_q, d, generator=gen)
    args = (torch.tensor([0]), torch.tensor([chunk]), torch.tensor([ctx]))
    # the same KV, contiguous: [heads, ctx, d]
    k_c, v_c = (
        c[table[0].long()].reshape(-1, h_kv, d)[:ctx].repeat_interleave(h_q // h_kv, 1)
        .transpose(0, 1).contiguous()
        for c in (kc, vc)
    )  # fmt: skip
    mask = torch.arange(ctx)[None, :] <= torch.arange(context, ctx)[:, None]

    def paged() -> None:
        paged_attention(q, kc, vc, table, *args)

    def sdpa() -> None:
        scaled_dot_product_attention(q.transpose(0, 1), k_c, v_c, attn_mask=mask)

    tp, ts = median(time_runs(paged, runs)), median(time_runs(sdpa, runs))
    return {
        "prefill_paged_ms": round(tp * 1e3, 3),
        "prefill_sdpa_ms": round(ts * 1e3, 3),
        "prefill_ratio": round(tp / ts, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64, help="2 MiB blocks gathered per run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128, help="new tokens of the prefill step")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    result: dict[str, object] = {"device": "cpu"}
    cpu = torch.device("cpu")
    result.update(bandwidth(cpu, args.blocks, args.runs))
    result.update(decode(cpu, args.batch, args.context, args.runs, torch.float32))
    result.update(prefill(args.chunk, args.context, args.runs))
    result["target_cpu_gather_over_memcpy"] = 0.5
    rows = [
        ("figure", "value", "baseline"),
        (
            "gather GB/s (2 MiB blocks)",
            str(result["gather_gbps"]),
            f"memcpy {result['memcpy_gbps']}",
        ),
        (
            "paged decode ms",
            str(result["decode_paged_ms"]),
            f"SDPA contiguous {result['decode_sdpa_ms']}",
        ),
        (
            f"paged prefill ms ({args.chunk} over {args.context})",
            str(result["prefill_paged_ms"]),
            f"SDPA contiguous {result['prefill_sdpa_ms']}",
        ),
    ]
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        cuda = bandwidth(gpu, args.blocks, args.runs)
        cuda.update(decode(gpu, 32, 4096, args.runs, torch.float16))
        result["cuda"] = cuda
        rows.append(("cuda gather / d2d GB/s", str(cuda["gather_gbps"]), str(cuda["d2d_gbps"])))
        rows.append(("cuda decode ratio (b32 x 4k)", str(cuda["decode_ratio"]), "1.0"))
    report(rows, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
