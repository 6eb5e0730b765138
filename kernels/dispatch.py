"""The one place that picks a kernel backend, and the public kernel functions.

Backends: ``torch`` (``kvmarina.kernels.reference``, everywhere) and ``triton``
(``kvmarina.kernels.triton_ops``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``auto`` takes triton for CUDA tensors when it imports,
torch otherwise. ``KVMARINA_KERNEL_BACKEND=torch|triton|auto`` overrides the
default; every function also takes ``backend=``. Asking for a backend that is
absent is an error that says why, never a silent fallback.

Every function checks shapes, dtypes and index ranges first: a bad argument
raises before any memory is touched.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

from kvmarina.kernels import reference
from kvmarina.kernels.checks import check_cache_pair, check_index, check_same, require

BACKENDS = ("auto", "torch", "triton")


class KernelBackendError(RuntimeError):
    """The requested backend cannot run here."""


@cache
def _triton_module() -> ModuleType:
    try:
        return importlib.import_module("kvmarina.kernels.triton_ops")
    except ImportError as exc:
        raise KernelBackendError(
            f"the triton backend needs the 'triton' package ({exc}); "
            "install kvmarina[gpu] or use KVMARINA_KERNEL_BACKEND=torch"
        ) from None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        _triton_module()
    except KernelBackendError:
        return False
    return True


def select(device: torch.device, backend: str | None = None) -> ModuleType:
    """The implementation module for tensors on ``device``."""
    choice = backend or os.environ.get("KVMARINA_KERNEL_BACKEND", "auto")
    if choice not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {choice!r}; use one of {BACKENDS}")
    if choice == "torch":
        return reference
    if choice == "triton":
        if device.type != "cuda" and not interpreting():
            raise KernelBackendError(
                "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                f"interpreter); these are on {device}"
            )
        return _triton_module()
    if device.type == "cuda" and triton_available():
        return _triton_module()
    return reference


def _block_pow2(k_cache: torch.Tensor, impl: ModuleType) -> None:
    b = k_cache.shape[1]
    if impl is not reference:
        require(b & (b - 1) == 0, f"the triton kernels need a power-of-two block size, got {b}")


# ---------------------------------------------------------------- public API


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str | None = None,
    check: bool = True,
) -> None:
    """Write new tokens' K and V ([T, H, D]) into the paged cache at their slots.

    ``check=False`` skips the argument checks, for a caller that has checked the
    same metadata already (the engine checks once per step, not once per layer).
    """
    impl = select(k.device, backend)
    if check:
        check_cache_pair(k_cache, v_cache)
        require(
            k.dim() == 3 and k.shape == v.shape,
            f"k and v must both be [T, H, D]; got {tuple(k.shape)} and {tuple(v.shape)}",
        )
        require(
            k.shape[1:] == k_cache.shape[2:],
            f"k is [T, {k.shape[1]}, {k.shape[2]}] but the cache holds "
            f"[.., {k_cache.shape[2]}, {k_cache.shape[3]}] per token",
        )
        check_same("k", k, k_cache)
        check_same("v", v, v_cache)
        require(
            slot_mapping.dim() == 1 and slot_mapping.numel() == k.shape[0],
            f"slot_mapping must have one slot per token ({k.shape[0]}), got {slot_mapping.numel()}",
        )
        check_index("slot_mapping", slot_mapping, k_cache.shape[0] * k_cache.shape[1])
        _block_pow2(k_cache, impl)
    impl.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)


def _check_tables(
    block_tables: torch.Tensor, ctx_lens: torch.Tensor, k_cache: torch.Tensor
) -> None:
    require(block_tables.dim() == 2, "block_tables must be [S, max_blocks]")
    s, mb = block_tables.shape
    require(
        ctx_lens.dim() == 1 and ctx_lens.numel() == s,
        f"ctx_lens must have one entry per sequence ({s})",
    )
    bsz = k_cache.shape[1]
    if s:
        ctx = [int(c) for c in ctx_lens.tolist()]
        lo, hi = min(ctx), max(ctx)
        require(lo >= 1, "every sequence needs at least one cached token")
        require(
            hi <= mb * bsz,
            f"a context of {hi} tokens needs more than the {mb} blocks of block_tables",
        )
        width = -(-hi // bsz)
        used = block_tables[:, :width]  # the entries past a context are never read
        if -(-lo // bsz) < width:  # ragged: each row's own blocks only
            nblk = torch.tensor([-(-c // bsz) for c in ctx], device=used.device)
            used = used[torch.arange(width, device=used.device)[None, :] < nblk[:, None]]
        check_index("block_tables", used, k_cache.shape[0])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float | None = None,
    backend: str | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix + themselves
    (chunked prefill and decode alike). K/V of the new tokens must already be cached."""
    impl = select(q.device, backend)
    if check:
        check_cache_pair(k_cache, v_cache)
        require(
            q.dim() == 3 and q.shape[2] == k_cache.shape[3],
            f"q must be [T, H_q, {k_cache.shape[3]}], got {tuple(q.shape)}",
        )
        require(
            q.shape[1] % k_cache.shape[2] == 0,
            f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads",
        )
        check_same("q", q, k_cache)
        _check_tables(block_tables, ctx_lens, k_cache)
        s = block_tables.shape[0]
        require(
            q_starts.numel() == s and q_lens.numel() == s,
            "q_starts and q_lens need one entry per sequence",
        )
        if s:
            require(int(q_lens.min()) >= 1, "every sequence needs at least one query token")
            require(bool((q_lens <= ctx_lens).all()), "q_lens may not exceed ctx_lens")
            require(int((q_starts + q_lens).max()) <= q.shape[0], "q_starts + q_lens run past q")
        _block_pow2(k_cache, impl)
    scale = scale if scale is not None else q.shape[2] ** -0.5
    out: torch.Tensor = impl.paged_attention(
        q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, scale
    )
    return out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float | None = None,
    backend: str | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Decode attention: one query token per sequence ([S, H_q, D])."""
    impl = select(q.device, backend)
    if check:
        check_cache_pair(k_cache, v_cache)
        require(
            q.dim() == 3 and q.shape[0] == block_tables.shape[0],
            "q must be [S, H_q, D] with one row per sequence of block_tables",
        )
        require(
            q.shape[1] % k_cache.shape[2] == 0 and q.shape[2] == k_cache.shape[3],
            f"q {tuple(q.shape)} does not fit caches of {k_cache.shape[2]} heads x "
            f"{k_cache.shape[3]}",
        )
        check_same("q", q, k_cache)
        _check_tables(block_tables, ctx_lens, k_cache)
        _block_pow2(k_cache, impl)
    scale = scale if scale is not None else q.shape[2] ** -0.5
    out: torch.Tensor = impl.paged_decode(q, k_cache, v_cache, block_tables, ctx_lens, scale)
    return out


def _check_rows(name: str, t: torch.Tensor) -> None:
    require(t.dim() >= 2, f"{name} must be [N, ...] with one block per row")
    require(
        t[0].is_contiguous() if t.shape[0] else True,
        f"{name}'s rows must each be one contiguous run of memory",
    )


def gather_blocks(
    src: torch.Tensor,
    ids: torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Blocks ``ids`` of ``src`` ([N, ...], rows contiguous) into one staging tensor."""
    _check_rows("src", src)
    require(ids.dim() == 1, "ids must be 1-D")
    check_index("ids", ids, src.shape[0])
    if out is not None:
        require(
            out.shape == (ids.numel(), *src.shape[1:]) and out.dtype == src.dtype,
            f"out must be {(ids.numel(), *src.shape[1:])} of {src.dtype}",
        )
        require(out.is_contiguous(), "out must be contiguous")
    return select(src.device, backend).gather_blocks(src, ids, out)  # type: ignore[no-any-return]


def scatter_blocks(
    staging: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, backend: str | None = None
) -> None:
    """Staging row i into block ``ids[i]`` of ``dst``."""
    _check_rows("dst", dst)
    require(
        staging.shape == (ids.numel(), *dst.shape[1:]) and staging.dtype == dst.dtype,
        f"staging must be {(ids.numel(), *dst.shape[1:])} of {dst.dtype}, "
        f"got {tuple(staging.shape)} of {staging.dtype}",
    )
    require(staging.is_contiguous(), "staging must be contiguous")
    check_index("ids", ids, dst.shape[0])
    require(len(set(ids.tolist())) == ids.numel(), "ids must not repeat (two writes to one block)")
    select(dst.device, backend).scatter_blocks(staging, dst, ids)


def copy_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    backend: str | None = None,
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]``: block moves between regions or tiers.

    Every read happens before any write: src and dst may be views of one region
    with ``src_ids`` and ``dst_ids`` overlapping (e.g. compacting a page)."""
    _check_rows("src", src)
    _check_rows("dst", dst)
    require(
        src.shape[1:] == dst.shape[1:] and src.dtype == dst.dtype,
        "src and dst blocks must have the same shape and dtype",
    )
    require(src_ids.numel() == dst_ids.numel(), "src_ids and dst_ids differ in length")
    check_index("src_ids", src_ids, src.shape[0])
    check_index("dst_ids", dst_ids, dst.shape[0])
    if src.device != dst.device:
        # cross-device (device <-> host tier): torch handles the transfer
        reference.copy_blocks(src, dst, src_ids, dst_ids)
        return
    impl = select(dst.device, backend)
    if reference.same_memory(src, dst) and set(src_ids.tolist()) & set(dst_ids.tolist()):
        # a block both read and written (moves within one region): read all first
        impl.scatter_blocks(impl.gather_blocks(src, src_ids, None), dst, dst_ids)
        return
    impl.copy_blocks(src, dst, src_ids, dst_ids)
