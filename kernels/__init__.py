"""kvmarina.kernels: block copy, reshape-and-cache and paged attention.

Torch references everywhere, Triton on CUDA; ``dispatch`` picks. See ``layout``
for where KV bytes sit.
"""

from kvmarina.kernels.dispatch import (
    KernelBackendError,
    copy_blocks,
    gather_blocks,
    paged_attention,
    paged_decode,
    reshape_and_cache,
    scatter_blocks,
)

__all__ = [
    "KernelBackendError",
    "copy_blocks",
    "gather_blocks",
    "paged_attention",
    "paged_decode",
    "reshape_and_cache",
    "scatter_blocks",
]
