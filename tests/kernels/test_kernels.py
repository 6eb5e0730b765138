"""Every kernel against the torch reference, and the reference against plain SDPA."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from kvmarina.kernels import (
    KernelBackendError,
    copy_blocks,
    gather_blocks,
    paged_attention,
    paged_decode,
    reshape_and_cache,
    scatter_blocks,
)
from kvmarina.kernels.dispatch import select, triton_available
from kvmarina.kernels.layout import blocks_view, flat_blocks, layer_views
from kvmarina.layout import KVLayout

CUDA = torch.cuda.is_available()
BACKENDS = ["torch"] + (["triton"] if triton_available() else [])
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_cache(n: int, b: int, h: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    k = torch.randn(n, b, h, d, generator=gen).to(dtype)
    v = torch.randn(n, b, h, d, generator=gen).to(dtype)
    return k, v


def oracle(q, k_cache, v_cache, tables, q_starts, q_lens, ctx_lens):
    """Contiguous SDPA per sequence: the KV made contiguous, causal with offset."""
    out = torch.empty_like(q)
    b, h_kv = k_cache.shape[1], k_cache.shape[2]
    g = q.shape[1] // h_kv
    for s in range(tables.shape[0]):
        st, n, ctx = int(q_starts[s]), int(q_lens[s]), int(ctx_lens[s])
        ids = tables[s, : -(-ctx // b)].long()
        k = k_cache[ids].reshape(-1, h_kv, k_cache.shape[3])[:ctx].float()
        v = v_cache[ids].reshape(-1, h_kv, v_cache.shape[3])[:ctx].float()
        qs = q[st : st + n].float().transpose(0, 1)
        kk = k.repeat_interleave(g, 1).transpose(0, 1)
        vv = v.repeat_interleave(g, 1).transpose(0, 1)
        mask = torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n)
        out[st : st + n] = (
            scaled_dot_product_attention(qs, kk, vv, attn_mask=mask).transpose(0, 1).to(q.dtype)
        )
    return out


def ragged_case(
    seed: int,
    dtype: torch.dtype,
    b: int,
    h_q: int,
    h_kv: int,
    d: int,
    ctx: list[int],
    new: list[int],
):
    gen = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-c // b) for c in ctx) + 3
    k_cache, v_cache = make_cache(n_blocks, b, h_kv, d, dtype, gen)
    perm = torch.randperm(n_blocks, generator=gen)
    mb = max(-(-c // b) for c in ctx)
    tables = torch.zeros(len(ctx), mb, dtype=torch.int32)
    used = 0
    for i, c in enumerate(ctx):
        nb = -(-c // b)
        tables[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    q_lens = torch.tensor(new)
    q_starts = torch.cumsum(q_lens, 0) - q_lens
    q = torch.randn(int(q_lens.sum()), h_q, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, q_starts, q_lens, torch.tensor(ctx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("b", "h_q", "h_kv", "d"), [(16, 4, 2, 32), (8, 8, 8, 16), (4, 6, 2, 24)])
def test_paged_attention_matches_sdpa(
    backend: str, dtype: torch.dtype, b: int, h_q: int, h_kv: int, d: int
) -> None:
    if backend == "triton" and b & (b - 1):
        pytest.skip("triton needs a power-of-two block size")
    case = ragged_case(0, dtype, b, h_q, h_kv, d, ctx=[37, 5, 64], new=[37, 2, 1])
    got = paged_attention(*case, backend=backend)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, oracle(*case), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_paged_decode_matches_reference(backend: str, dtype: torch.dtype) -> None:
    q, kc, vc, tables, _, _, ctx = ragged_case(
        1, dtype, 16, 8, 2, 32, ctx=[1, 17, 40, 33], new=[1, 1, 1, 1]
    )
    got = paged_decode(q, kc, vc, tables, ctx, backend=backend)
    ones = torch.ones(4, dtype=torch.int64)
    want = oracle(q, kc, vc, tables, torch.arange(4), ones, ctx)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_long_ragged_contexts_on_layer_views(backend: str) -> None:
    """Long contexts at small batch: the triton decode splits each sequence's blocks
    over several programs and merges them; the caches are strided cross-layer views."""
    lay = KVLayout(2, 2, 16, "float16", 8)
    gen = torch.Generator().manual_seed(6)
    blocks = blocks_view(
        torch.randn(lay.bytes_per_block * 90 // 2, generator=gen).half().view(torch.uint8), lay
    )
    kc, vc = layer_views(blocks, 1)
    ctx = torch.tensor([300, 9, 1])
    perm = torch.randperm(blocks.shape[0], generator=gen)[:45].to(torch.int32)
    tables = torch.stack([perm[:38], perm[38:45].repeat(6)[:38], perm[:38].flip(0)])
    q = torch.randn(3, 6, 16, generator=gen).half()
    got = paged_decode(q, kc, vc, tables, ctx, backend=backend)
    ones = torch.ones(3, dtype=torch.int64)
    want = oracle(q, kc, vc, tables, torch.arange(3), ones, ctx)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ctx", [[1], [16], [37], [37, 37], [5, 37, 16]], ids=str)
@pytest.mark.parametrize("heads", [(8, 2, 32), (8, 8, 256)], ids=["small-blocks", "big-blocks"])
def test_paged_decode_with_wide_tables_and_equal_or_ragged_contexts(
    backend: str, ctx: list[int], heads: tuple[int, int, int]
) -> None:
    """Tables wider than the longest context (the columns past it are never read),
    contexts all equal (no mask needed: batch 1) or ragged (masked); blocks small
    and big (16 x 8 x 256 values: the torch gather takes its other path)."""
    q, kc, vc, tables, _, _, ctx_lens = ragged_case(
        4, torch.float32, 16, *heads, ctx=ctx, new=[1] * len(ctx)
    )
    wide = torch.cat([tables, torch.full((len(ctx), 3), 10**6, dtype=tables.dtype)], 1)
    got = paged_decode(q, kc, vc, wide, ctx_lens, backend=backend)
    ones = torch.ones(len(ctx), dtype=torch.int64)
    want = oracle(q, kc, vc, tables, torch.arange(len(ctx)), ones, ctx_lens)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if backend == "torch":  # the argument checks read only the columns in use too
        torch.testing.assert_close(paged_decode(q, kc, vc, tables, ctx_lens), got)


def test_paged_decode_of_no_sequence_is_empty() -> None:
    kc, vc = make_cache(4, 8, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    empty = torch.zeros(0, 4, 16)
    tables = torch.zeros(0, 1, dtype=torch.int32)
    out = paged_decode(empty, kc, vc, tables, torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reshape_and_cache_writes_slots(backend: str, dtype: torch.dtype) -> None:
    lay = KVLayout(3, 2, 16, "float32" if dtype == torch.float32 else "bfloat16", 8)
    buf = torch.zeros(lay.bytes_per_block * 6, dtype=torch.uint8)
    blocks = blocks_view(buf, lay)
    kc, vc = layer_views(blocks, 1)  # strided views: the cross-layer layout
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(5, 2, 16, generator=gen).to(dtype)
    v = torch.randn(5, 2, 16, generator=gen).to(dtype)
    slots = torch.tensor([0, 9, 10, 47, 23])
    reshape_and_cache(k, v, kc, vc, slots, backend=backend)
    for t, s in enumerate(slots.tolist()):
        assert torch.equal(blocks[s // 8, 1, 0, s % 8], k[t])
        assert torch.equal(blocks[s // 8, 1, 1, s % 8], v[t])
    assert blocks[:, 0].abs().sum() == 0 and blocks[:, 2].abs().sum() == 0  # other layers untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_copy_gather_scatter(backend: str) -> None:
    lay = KVLayout(2, 2, 8, "float16", 4)
    gen = torch.Generator().manual_seed(3)
    src = blocks_view(
        torch.randint(0, 255, (lay.bytes_per_block * 8,), dtype=torch.uint8, generator=gen), lay
    )
    dst = blocks_view(torch.zeros(lay.bytes_per_block * 5, dtype=torch.uint8), lay)
    ids = torch.tensor([6, 1, 3])
    staging = gather_blocks(flat_blocks(src), ids, backend=backend)
    assert staging.is_contiguous() and staging.shape == (3, lay.bytes_per_block)
    assert torch.equal(staging, flat_blocks(src)[ids])
    scatter_blocks(staging, flat_blocks(dst), torch.tensor([4, 0, 2]), backend=backend)
    fs, fd = flat_blocks(src), flat_blocks(dst)  # compare bytes: random halves hold NaNs
    assert torch.equal(fd[4], fs[6]) and torch.equal(fd[0], fs[1]) and torch.equal(fd[2], fs[3])
    copy_blocks(src, dst, torch.tensor([7]), torch.tensor([1]), backend=backend)
    assert torch.equal(fd[1], fs[7])
    # per-layer paged layout: one tensor per layer, blocks along dim 0
    per_layer = torch.randn(8, 4, 2, 8, generator=gen)
    torch.testing.assert_close(gather_blocks(per_layer, ids, backend=backend), per_layer[ids])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row_bytes", [256, 128 * 1024])  # below / above the row-loop size
def test_block_copy_within_one_region_reads_before_writing(backend: str, row_bytes: int) -> None:
    if backend == "triton" and row_bytes > 256:
        pytest.skip("big rows only take a different path in the torch backend")
    gen = torch.Generator().manual_seed(5)
    region = torch.randint(0, 255, (6, row_bytes), dtype=torch.uint8, generator=gen)
    before = region.clone()
    # a chain: 0 -> 1 -> 2 -> 3; each destination must get the *old* source bytes
    copy_blocks(region, region, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), backend=backend)
    assert torch.equal(region[1:4], before[0:3])
    assert torch.equal(region[0], before[0]) and torch.equal(region[4:], before[4:])
    # disjoint moves in one region, and big rows through gather/scatter
    copy_blocks(region, region, torch.tensor([5]), torch.tensor([0]), backend=backend)
    assert torch.equal(region[0], before[5])
    staging = gather_blocks(region, torch.tensor([3, 5]), backend=backend)
    assert torch.equal(staging, region[[3, 5]])
    scatter_blocks(staging, region, torch.tensor([4, 1]), backend=backend)
    assert torch.equal(region[4], before[2]) and torch.equal(region[1], before[5])


def test_big_row_copies_shared_over_workers() -> None:
    """Enough big rows that the CPU copy splits them over worker threads."""
    gen = torch.Generator().manual_seed(7)
    src = torch.randint(0, 255, (20, 64 * 1024), dtype=torch.uint8, generator=gen)
    ids = torch.randperm(20, generator=gen)[:12]
    staging = gather_blocks(src, ids, backend="torch")
    assert torch.equal(staging, src[ids])
    dst = torch.zeros(16, 64 * 1024, dtype=torch.uint8)
    scatter_blocks(staging, dst, torch.arange(15, 3, -1), backend="torch")
    assert torch.equal(dst[4:].flip(0), src[ids]) and dst[:4].sum() == 0
    copy_blocks(src, dst, ids[:10], torch.arange(10), backend="torch")
    assert torch.equal(dst[:10], src[ids[:10]])


def test_bad_arguments_fail_before_touching_memory() -> None:
    kc, vc = make_cache(4, 8, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    before = kc.clone()
    k = torch.ones(2, 2, 16)
    with pytest.raises(IndexError, match=r"slot_mapping has entries in 0\.\.32, outside 0\.\.31"):
        reshape_and_cache(k, k, kc, vc, torch.tensor([0, 32]))
    with pytest.raises(ValueError, match="dtype"):
        reshape_and_cache(k.half(), k.half(), kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one slot per token"):
        reshape_and_cache(k, k, kc, vc, torch.tensor([0]))
    assert torch.equal(kc, before)
    q = torch.ones(1, 4, 16)
    with pytest.raises(IndexError, match="block_tables"):
        paged_decode(q, kc, vc, torch.tensor([[0, 9]]), torch.tensor([12]))
    with pytest.raises(ValueError, match=r"needs more than the 1 blocks"):
        paged_decode(q, kc, vc, torch.tensor([[0]]), torch.tensor([12]))
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode(torch.ones(1, 3, 16), kc, vc, torch.tensor([[0]]), torch.tensor([3]))
    with pytest.raises(IndexError, match="ids"):
        gather_blocks(kc, torch.tensor([4]))
    with pytest.raises(ValueError, match="must not repeat"):
        scatter_blocks(torch.zeros(2, 8, 2, 16), kc, torch.tensor([1, 1]))


def test_backend_selection_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmarina.kernels import reference

    cpu = torch.device("cpu")
    assert select(cpu, "auto") is reference
    with pytest.raises(KernelBackendError, match="unknown kernel backend"):
        select(cpu, "cuda-magic")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelBackendError, match="needs CUDA tensors"):
        select(cpu, "triton")
    monkeypatch.setenv("KVMARINA_KERNEL_BACKEND", "torch")
    assert select(cpu) is reference


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here); run on a GPU machine")
def test_triton_on_cuda_matches_reference() -> None:
    case = ragged_case(4, torch.float16, 16, 32, 8, 128, ctx=[4096, 100, 2000], new=[1, 100, 16])
    case = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in case)
    got = paged_attention(*case, backend="triton")
    want = paged_attention(*case, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    q, kc, vc, tables, _, _, ctx = case
    q1 = q[:3].contiguous()  # one query token per sequence: the split decode kernel
    got = paged_decode(q1, kc, vc, tables, ctx, backend="triton")
    torch.testing.assert_close(
        got, paged_decode(q1, kc, vc, tables, ctx, backend="torch"), atol=2e-3, rtol=2e-3
    )
