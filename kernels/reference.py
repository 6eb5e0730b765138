"""Plain-torch kernels: the CPU implementation and the oracle of every other backend.

Shapes (see ``kvmarina.kernels.layout``):
    k_cache, v_cache  [N, B, H_kv, D]   one layer, N blocks of B tokens (may be strided views)
    q                 [T, H_q, D]       T query tokens of S sequences, concatenated
    block_tables      [S, MB] int       block ids of each sequence, in order
    q_starts, q_lens  [S] int           where each sequence's queries sit in q
    ctx_lens          [S] int           tokens in the cache for each sequence, new ones included
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from torch.nn.functional import scaled_dot_product_attention


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's K/V ([T, H, D]) to slot ``slot_mapping[t]`` = block * B + offset."""
    b = k_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    where = (slots // b, slots % b)
    k_cache.index_put_(where, k)
    v_cache.index_put_(where, v)


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
    """Causal attention of new tokens over their sequence's cached tokens (prefix + new).

    Query i of a sequence with ``n`` new tokens and ``ctx`` cached tokens sits at
    absolute position ``ctx - n + i`` and sees cache positions ``0 .. ctx - n + i``.
    """
    out = torch.empty_like(q)
    bsz, d = k_cache.shape[1], k_cache.shape[3]
    h_q, h_kv = q.shape[1], k_cache.shape[2]
    groups = h_q // h_kv
    for s in range(block_tables.shape[0]):
        start, n, ctx = int(q_starts[s]), int(q_lens[s]), int(ctx_lens[s])
        nblk = -(-ctx // bsz)
        ids = block_tables[s, :nblk].to(torch.int64)
        k = k_cache[ids].reshape(-1, h_kv, d)[:ctx].float().transpose(0, 1)  # [H_kv, ctx, D]
        v = v_cache[ids].reshape(-1, h_kv, d)[:ctx].float().transpose(0, 1)
        # the query heads that share a KV head as one batch of rows: [H_kv, G*n, D]
        qs = q[start : start + n].float().view(n, h_kv, groups, d).permute(1, 2, 0, 3)
        scores = torch.bmm(qs.reshape(h_kv, groups * n, d), k.transpose(1, 2)).mul_(scale)
        # every query sees the whole cached prefix: only the last n columns (the new
        # tokens themselves) need the causal mask, so the mask is [n, n], not [n, ctx]
        future = torch.ones(n, n, dtype=torch.bool).triu_(1)
        scores.view(h_kv, groups, n, ctx)[..., ctx - n :].masked_fill_(future, float("-inf"))
        o = torch.bmm(torch.softmax(scores, dim=-1), v)  # [H_kv, G*n, D]
        out[start : start + n] = o.view(h_kv, groups, n, d).permute(2, 0, 1, 3).reshape(n, h_q, d)
    return out


# torch's intra-op grain (at::internal::GRAIN_SIZE): index_select copies a block of at
# least this many elements as its own copy (a parallel region each, slow on a busy box)
_INDEX_SELECT_MAX = 32768


def _gather_kv(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``ids`` of one layer's cache (``[N, B, H, D]``, maybe strided) as one
    contiguous ``[len(ids), B, H, D]``. Small blocks: ``index_select`` (a memcpy per
    block, in one parallel region at most; ~4 us against ~14 us for advanced indexing
    on the small preset at batch 1); big ones: advanced indexing (one pass over the
    whole output)."""
    if cache[0].numel() < _INDEX_SELECT_MAX:
        return cache.index_select(0, ids)  # int32 or int64 ids: it takes both
    return cache[ids.to(torch.int64)]


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (decode), all sequences at once.

    GQA without repeating K/V: the ``groups`` query heads sharing a KV head are
    laid out as SDPA's query-length axis, so torch's fused kernel does the work.

    Only the blocks the longest context uses are gathered (one ``index_select`` per
    cache, whatever the width of ``block_tables``), and the keys stop at that context:
    when every sequence has the same length (always at batch 1) no mask is needed.
    """
    s, h_q, d = q.shape
    if s == 0:
        return torch.empty_like(q)
    bsz, h_kv = k_cache.shape[1], k_cache.shape[2]
    groups = h_q // h_kv
    ctx = ctx_lens.tolist()
    longest = max(ctx)
    nblk = -(-longest // bsz)
    ids = block_tables[:, :nblk].reshape(-1)
    k = _gather_kv(k_cache, ids).view(s, nblk * bsz, h_kv, d)[:, :longest].transpose(1, 2)
    v = _gather_kv(v_cache, ids).view(s, nblk * bsz, h_kv, d)[:, :longest].transpose(1, 2)
    qs = q.view(s, h_kv, groups, d)
    mask = None
    if min(ctx) < longest:  # ragged: hide each shorter sequence's tail
        valid = torch.arange(longest, device=q.device)[None, :] < ctx_lens.to(q.device)[:, None]
        mask = valid[:, None, None, :]  # [S, 1, 1, K]
    out = scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
    return out.reshape(s, h_q, d)


# Rows at least this big are copied one by one, several rows at a time (see _copy_rows).
_ROW_LOOP_BYTES = 64 * 1024
# Rows per worker below which a second thread costs more than it saves.
_ROWS_PER_WORKER = 4


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` with contiguous rows as ``[N, row_bytes]`` uint8 (a view)."""
    return t.flatten(1).view(torch.uint8)


@cache
def _copy_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process: a forked child inherits the pool but not its threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="kvmarina-copy")


def _copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int]
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for big CPU rows, one plain memcpy each.

    Why not ``index_select``/``index_copy_``: they copy a big row with torch's
    intra-op thread pool, one parallel region per row. On a loaded machine a
    worker is often descheduled and every region waits for it (measured here:
    2 MiB rows at 0.3 GB/s against 15 GB/s for one memcpy of the same bytes).
    Here each worker copies a share of the rows on its own (numpy copies drop
    the GIL) and the caller waits once, not once per row.
    """
    s, d = _byte_rows(src).numpy(), _byte_rows(dst).numpy()
    pairs = list(zip(src_ids, dst_ids, strict=True))

    def run(share: list[tuple[int, int]]) -> None:
        for i, j in share:
            d[j] = s[i]

    workers = max(1, min(torch.get_num_threads(), len(pairs) // _ROWS_PER_WORKER))
    if workers == 1:
        run(pairs)
        return
    shares = [pairs[w::workers] for w in range(workers)]
    futures = [_copy_pool(workers, os.getpid()).submit(run, share) for share in shares[1:]]
    run(shares[0])
    for f in futures:
        f.result()


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage (a copy between them may overlap)."""
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _row_loop(src: torch.Tensor, dst: torch.Tensor) -> bool:
    return (
        src.device.type == "cpu"
        and dst.device.type == "cpu"
        and src[0].numel() * src.element_size() >= _ROW_LOOP_BYTES
        and not src.requires_grad
        and not dst.requires_grad
    )


def gather_blocks(
    src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``ids`` of ``src`` ([N, ...]) into one contiguous staging tensor."""
    idx = ids.to(torch.int64)
    if out is None:
        out = torch.empty((idx.numel(), *src.shape[1:]), dtype=src.dtype, device=src.device)
    if idx.numel() and _row_loop(src, out):
        _copy_rows(src, out, idx.tolist(), list(range(idx.numel())))
        return out
    torch.index_select(src, 0, idx, out=out)
    return out


def scatter_blocks(staging: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor) -> None:
    """Write staging row i to ``dst[ids[i]]``."""
    if ids.numel() and _row_loop(staging, dst):
        _copy_rows(staging, dst, list(range(ids.numel())), ids.tolist())
        return
    dst.index_copy_(0, ids.to(torch.int64), staging)


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` (e.g. device tier <-> host tier); every
    read happens before any write, so src and dst may be one region."""
    if src_ids.numel() and _row_loop(src, dst) and not same_memory(src, dst):
        _copy_rows(src, dst, src_ids.tolist(), dst_ids.tolist())
        return
    dst.index_copy_(
        0, dst_ids.to(torch.int64), src.index_select(0, src_ids.to(torch.int64)).to(dst.device)
    )
