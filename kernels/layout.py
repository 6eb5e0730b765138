"""Where KV bytes sit in a pool page, and the tensor views the kernels work on.

kvmarina stores KV in the **cross-layer block layout**: one block holds every
layer's K and V for ``block_size`` tokens as one contiguous run of bytes::

    page (e.g. 2 MiB) = [ block 0 | block 1 | ... | block n-1 | (unused tail) ]

    block b = [ layer 0: K | layer 0: V | layer 1: K | layer 1: V | ... ]
    layer l, K (or V) = [ token 0 | token 1 | ... | token B-1 ]
    token t          = [ kv head 0: head_dim values | kv head 1 | ... ]

    as a tensor: blocks[N, L, 2, B, H, D]   (N blocks, L layers, K/V, B tokens, H heads, D dims)

Why: a block is the unit the agent indexes, evicts, moves between tiers and
sends to peers. With all layers in one run of bytes, moving a block is one
memcpy or one socket write instead of ``2 * L`` small ones (the per-layer
paged layout of vLLM scatters a block over ``2 * L`` tensors).

Attention still wants one layer at a time. ``layer_views`` gives, for layer
``l``, the K and V caches as ``[N, B, H, D]`` tensors that are *strided views*
into the same memory (stride over blocks = ``L * 2 * B * H * D``), so the
per-layer paged kernels run on the cross-layer layout without any copy. A
per-layer paged layout (separate ``[N, B, H, D]`` tensors per layer) is
accepted by the same kernels unchanged: they only assume the last three
dimensions of a cache are dense.
"""

from __future__ import annotations

import torch

from kvmarina.layout import KVLayout

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def blocks_view(buffer: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A uint8 buffer of whole blocks viewed as ``[N, L, 2, B, H, D]`` of the layout's dtype."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("buffer must be a 1-D uint8 tensor")
    n = buffer.numel() // layout.bytes_per_block
    if n == 0:
        raise ValueError(
            f"buffer of {buffer.numel()} bytes holds no block of {layout.bytes_per_block} bytes"
        )
    dtype = TORCH_DTYPES[layout.dtype]
    used = buffer[: n * layout.bytes_per_block]
    return used.view(dtype).view(
        n, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim
    )


def layer_views(blocks: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches of one layer, ``[N, B, H, D]`` each, as strided views (no copy)."""
    if blocks.dim() != 6:
        raise ValueError("expected blocks as [N, L, 2, B, H, D]")
    if not 0 <= layer < blocks.shape[1]:
        raise IndexError(f"layer {layer} is outside 0..{blocks.shape[1] - 1}")
    return blocks[:, layer, 0], blocks[:, layer, 1]


def flat_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``[N, L, 2, B, H, D]`` as ``[N, bytes_per_block]`` uint8: each row one block."""
    n = blocks.shape[0]
    return blocks.reshape(n, -1).view(torch.uint8)
