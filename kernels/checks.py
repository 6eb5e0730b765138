"""Argument checks shared by every backend, run before any memory is touched.

A bad index in a kernel is silent corruption (or a device fault); here it is a
``ValueError``/``IndexError`` that names the argument and the allowed range.
"""

from __future__ import annotations

import torch


def require(cond: bool, message: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(message)


def check_index(name: str, idx: torch.Tensor, upper: int) -> None:
    """Every entry of an integer tensor ``idx`` lies in ``0 .. upper - 1``."""
    require(
        not idx.is_floating_point() and idx.dtype != torch.bool,
        f"{name} must be an integer tensor, got {idx.dtype}",
    )
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    require(
        lo >= 0 and hi < upper,
        f"{name} has entries in {lo}..{hi}, outside 0..{upper - 1}",
        IndexError,
    )


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    require(k_cache.dim() == 4, f"k_cache must be [N, B, H, D], got shape {tuple(k_cache.shape)}")
    require(
        k_cache.shape == v_cache.shape,
        f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ",
    )
    require(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    require(k_cache.device == v_cache.device, "k_cache and v_cache are on different devices")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _, h, d = c.shape[1:]
        require(
            c.stride(3) == 1 and c.stride(2) == d and c.stride(1) == h * d,
            f"{name}'s last three dims must be dense (a block may be strided, a token not)",
        )


def check_same(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    require(t.dtype == ref.dtype, f"{name} dtype {t.dtype} does not match the cache's {ref.dtype}")
    require(t.device == ref.device, f"{name} is on {t.device}, the cache on {ref.device}")
