"""Triton implementations of the kernels (imported only when the triton backend is used).

Same signatures and semantics as ``kvmarina.kernels.reference``; the tests compare
them with ``torch.testing.assert_close``. On CPU they run under the Triton
interpreter (``TRITON_INTERPRET=1``); on CUDA they compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows_kernel(
    src, dst, src_ids, dst_ids, src_stride, dst_stride, width, BLOCK: tl.constexpr
):
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(src_ids + i).to(tl.int64)
    d = tl.load(dst_ids + i).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    m = offs < width
    x = tl.load(src + s * src_stride + offs, mask=m)
    tl.store(dst + d * dst_stride + offs, x, mask=m)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """Rows of bytes viewed as the widest integer type that divides them (fewer loads)."""
    flat = t.reshape(t.shape[0], -1) if t.is_contiguous() else t.flatten(1)
    if flat.dtype == torch.uint8 or flat.element_size() < 4:
        flat = flat.view(torch.uint8)
        width = flat.shape[1]
        for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
            if width % size == 0 and flat.stride(0) % size == 0:
                return flat.view(dtype)
    return flat


def copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    s, d = _as_words(src), _as_words(dst)
    width = s.shape[1]
    block = min(4096, triton.next_power_of_2(width))
    grid = (int(src_ids.numel()), triton.cdiv(width, block))
    if grid[0] == 0:
        return
    _copy_rows_kernel[grid](
        s,
        d,
        src_ids.to(torch.int32),
        dst_ids.to(torch.int32),
        s.stride(0),
        d.stride(0),
        width,
        BLOCK=block,
    )


def gather_blocks(
    src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = torch.empty((ids.numel(), *src.shape[1:]), dtype=src.dtype, device=src.device)
    rows = torch.arange(ids.numel(), device=src.device, dtype=torch.int32)
    copy_rows(src, out, ids, rows)
    return out


def scatter_blocks(staging: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor) -> None:
    rows = torch.arange(ids.numel(), device=dst.device, dtype=torch.int32)
    copy_rows(staging, dst, rows, ids)


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    copy_rows(src, dst, src_ids, dst_ids)


@triton.jit
def _cache_kernel(
    k,
    v,
    kc,
    vc,
    slots,
    s_kt,
    s_kh,
    s_vt,
    s_vh,
    s_cn,
    s_cb,
    s_ch,
    s_vn,
    s_vb,
    s_vch,
    block_size,
    head_dim,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    d = tl.arange(0, BLOCK_D)
    m = d < head_dim
    x = tl.load(k + t * s_kt + h * s_kh + d, mask=m)
    tl.store(kc + blk * s_cn + off * s_cb + h * s_ch + d, x, mask=m)
    y = tl.load(v + t * s_vt + h * s_vh + d, mask=m)
    tl.store(vc + blk * s_vn + off * s_vb + h * s_vch + d, y, mask=m)


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    t, h, d = k.shape
    if t == 0:
        return
    _cache_kernel[(t, h)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping.to(torch.int64),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_cache.shape[1],
        d,
        BLOCK_D=triton.next_power_of_2(d),
    )


@triton.jit
def _attn_kernel(
    q,
    kc,
    vc,
    out,
    tables,
    tok_seq,
    tok_pos,
    scale,
    s_qt,
    s_qh,
    s_ot,
    s_oh,
    s_cn,
    s_cb,
    s_ch,
    s_vn,
    s_vb,
    s_vh,
    s_bt,
    groups,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tok_seq + t).to(tl.int64)
    pos = tl.load(tok_pos + t).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gm = g < groups
    dm = d < head_dim
    heads = h * groups + g
    qv = tl.load(
        q + t * s_qt + heads[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0
    ).to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    b = tl.arange(0, BLOCK_SIZE)
    n_blocks = pos // BLOCK_SIZE + 1
    for j in range(0, n_blocks):
        blk = tl.load(tables + seq * s_bt + j).to(tl.int64)
        kpos = j * BLOCK_SIZE + b
        km = kpos <= pos
        kv_mask = km[:, None] & dm[None, :]
        kt = tl.load(
            kc + blk * s_cn + b[:, None] * s_cb + h * s_ch + d[None, :], mask=kv_mask, other=0.0
        ).to(tl.float32)
        s = tl.sum(qv[:, None, :] * kt[None, :, :], 2) * scale
        s = tl.where(km[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            vc + blk * s_vn + b[:, None] * s_vb + h * s_vh + d[None, :], mask=kv_mask, other=0.0
        ).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], 1)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(
        out + t * s_ot + heads[:, None] * s_oh + d[None, :],
        o.to(out.dtype.element_ty),
        mask=gm[:, None] & dm[None, :],
    )


def _token_maps(
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    total: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.repeat_interleave(torch.arange(q_lens.numel()), q_lens.cpu().to(torch.int64))
    starts = q_starts.cpu().to(torch.int64)
    first_pos = (ctx_lens.cpu() - q_lens.cpu()).to(torch.int64)
    idx = torch.arange(total)
    pos = first_pos[seq] + (idx - starts[seq])
    return seq.to(device, torch.int32), pos.to(device, torch.int32)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    t, h_q, d = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    h_kv = k_cache.shape[2]
    groups = h_q // h_kv
    tok_seq, tok_pos = _token_maps(q_starts, q_lens, ctx_lens, t, q.device)
    tables = block_tables.to(torch.int32).contiguous()
    _attn_kernel[(t, h_kv)](
        q,
        k_cache,
        v_cache,
        out,
        tables,
        tok_seq,
        tok_pos,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        tables.stride(0),
        groups,
        d,
        BLOCK_SIZE=k_cache.shape[1],
        G_PAD=max(2, triton.next_power_of_2(groups)),
        D_PAD=triton.next_power_of_2(d),
    )
    return out


@triton.jit
def _decode_split_kernel(
    q,
    kc,
    vc,
    tables,
    ctx_lens,
    part_m,
    part_l,
    part_acc,
    scale,
    s_qs,
    s_qh,
    s_cn,
    s_cb,
    s_ch,
    s_vn,
    s_vb,
    s_vh,
    s_bt,
    groups,
    head_dim,
    blocks_per_split,
    BLOCK_SIZE: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """One (sequence, KV head, split): attention over its share of the blocks,
    left unnormalised as (running max m, sum l, weighted values acc)."""
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    n_kv = tl.num_programs(1)
    n_sp = tl.num_programs(2)
    ctx = tl.load(ctx_lens + seq).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gm = g < groups
    dm = d < head_dim
    heads = h * groups + g
    qv = tl.load(
        q + seq * s_qs + heads[:, None] * s_qh + d[None, :],
        mask=gm[:, None] & dm[None, :],
        other=0.0,
    ).to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    b = tl.arange(0, BLOCK_SIZE)
    n_blocks = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    first = sp * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_blocks)
    for j in range(first, last):
        blk = tl.load(tables + seq * s_bt + j).to(tl.int64)
        kpos = j * BLOCK_SIZE + b
        km = kpos < ctx
        kv_mask = km[:, None] & dm[None, :]
        kt = tl.load(
            kc + blk * s_cn + b[:, None] * s_cb + h * s_ch + d[None, :], mask=kv_mask, other=0.0
        ).to(tl.float32)
        vt = tl.load(
            vc + blk * s_vn + b[:, None] * s_vb + h * s_vh + d[None, :], mask=kv_mask, other=0.0
        ).to(tl.float32)
        sc = tl.sum(qv[:, None, :] * kt[None, :, :], 2) * scale
        sc = tl.where(km[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], 1)
        m_i = m_new
    row = (seq * n_kv + h) * n_sp + sp
    tl.store(part_m + row * G_PAD + g, m_i)
    tl.store(part_l + row * G_PAD + g, l_i)
    tl.store(part_acc + (row * G_PAD + g[:, None]) * D_PAD + d[None, :], acc)


@triton.jit
def _decode_reduce_kernel(
    part_m,
    part_l,
    part_acc,
    out,
    s_os,
    s_oh,
    groups,
    head_dim,
    n_splits,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    SP_PAD: tl.constexpr,
):
    """Merge the splits of one (sequence, KV head): rescale each to the common max."""
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n_kv = tl.num_programs(1)
    sp = tl.arange(0, SP_PAD)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    spm = sp < n_splits
    rows = (seq * n_kv + h) * n_splits + sp
    ms = tl.load(
        part_m + rows[:, None] * G_PAD + g[None, :], mask=spm[:, None], other=float("-inf")
    )
    ls = tl.load(part_l + rows[:, None] * G_PAD + g[None, :], mask=spm[:, None], other=0.0)
    m = tl.max(ms, 0)
    # an empty split has m = -inf: weight 0 (every sequence has >= 1 token, so m is finite)
    w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - m[None, :]))
    l_tot = tl.sum(w * ls, 0)
    accs = tl.load(
        part_acc + (rows[:, None, None] * G_PAD + g[None, :, None]) * D_PAD + d[None, None, :],
        mask=spm[:, None, None],
        other=0.0,
    )
    o = tl.sum(w[:, :, None] * accs, 0) / l_tot[:, None]
    heads = h * groups + g
    tl.store(
        out + seq * s_os + heads[:, None] * s_oh + d[None, :],
        o.to(out.dtype.element_ty),
        mask=(g < groups)[:, None] & (d < head_dim)[None, :],
    )


def _num_splits(seqs: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Split each sequence's blocks so the grid has a few programs per SM (long
    contexts at small batch would otherwise leave most of the GPU idle)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 8  # the interpreter: small shapes still get split (the tests cover it)
    want = -(-4 * sms // max(1, seqs * kv_heads))
    return max(1, min(want, max_blocks, 64))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Split-KV decode: per (sequence, KV head, split) partial softmax, then a merge."""
    s, h_q, d = q.shape
    out = torch.empty_like(q)
    if s == 0:
        return out
    h_kv = k_cache.shape[2]
    groups = h_q // h_kv
    bsz = k_cache.shape[1]
    tables = block_tables.to(torch.int32).contiguous()
    max_blocks = max(1, -(-int(ctx_lens.max()) // bsz))
    splits = _num_splits(s, h_kv, max_blocks, q.device)
    per_split = -(-max_blocks // splits)
    splits = -(-max_blocks // per_split)  # no split left with nothing to do at the longest
    g_pad, d_pad = max(2, triton.next_power_of_2(groups)), triton.next_power_of_2(d)
    part_m = torch.empty(s * h_kv * splits * g_pad, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(s * h_kv * splits * g_pad * d_pad, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(s, h_kv, splits)](
        q,
        k_cache,
        v_cache,
        tables,
        ctx_lens.to(device=q.device, dtype=torch.int32),
        part_m,
        part_l,
        part_acc,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        tables.stride(0),
        groups,
        d,
        per_split,
        BLOCK_SIZE=bsz,
        G_PAD=g_pad,
        D_PAD=d_pad,
    )
    _decode_reduce_kernel[(s, h_kv)](
        part_m,
        part_l,
        part_acc,
        out,
        out.stride(0),
        out.stride(1),
        groups,
        d,
        splits,
        G_PAD=g_pad,
        D_PAD=d_pad,
        SP_PAD=max(2, triton.next_power_of_2(splits)),
    )
    return out
