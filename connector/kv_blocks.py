"""The worker's side: copying whole blocks between vLLM's paged KV and the agent's pages.

vLLM hands the connector one tensor per attention layer; each has a dimension of
``num_blocks`` (the block id), whatever the backend's layout around it (CPU:
``[blocks, heads, block_size, 2 x head_size]``; CUDA flash attention:
``[2, blocks, block_size, heads, head_size]``). A block of the agent holds, layer after
layer, that layer's slice for one block id, as vLLM lays it out: the bytes round-trip
exactly, and engines of another layout never read them (the block identity names
vLLM's format, ``kv_format``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch


class LayoutMismatch(ValueError):
    """vLLM's KV tensors do not fit the block size the agent was registered with."""


class PagedKV:
    """vLLM's per-layer KV tensors, addressed by block id.

    Invariant: every layer has a ``num_blocks`` dimension (``dims[i]``), and
    ``block_bytes`` is the sum over layers of one block's slice in bytes."""

    def __init__(self, layers: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        self.names = sorted(layers)
        self.layers = [layers[n] for n in self.names]
        self.dims = [
            self._block_dim(t, num_blocks, n) for t, n in zip(self.layers, self.names, strict=True)
        ]
        self.slice_bytes = [
            t.select(d, 0).numel() * t.element_size()
            for t, d in zip(self.layers, self.dims, strict=True)
        ]
        self.block_bytes = sum(self.slice_bytes)

    @staticmethod
    def _block_dim(t: torch.Tensor, num_blocks: int, name: str) -> int:
        for d, size in enumerate(t.shape):
            if size == num_blocks:
                return d
        shape = tuple(t.shape)
        raise LayoutMismatch(f"layer {name}: no dimension of {num_blocks} blocks in {shape}")

    def read(self, block_id: int, out: torch.Tensor) -> None:
        """Copy one block, every layer, into ``out`` (``block_bytes`` uint8)."""
        off = 0
        for t, d, n in zip(self.layers, self.dims, self.slice_bytes, strict=True):
            src = t.select(d, block_id)
            out[off : off + n].view(t.dtype).view(src.shape).copy_(src)
            off += n

    def write(self, block_id: int, data: torch.Tensor) -> None:
        """Copy ``data`` (one block's ``block_bytes``) into vLLM's block ``block_id``."""
        off = 0
        for t, d, n in zip(self.layers, self.dims, self.slice_bytes, strict=True):
            dst = t.select(d, block_id)
            dst.copy_(data[off : off + n].view(t.dtype).view(dst.shape))
            off += n


def load_blocks(
    kv: PagedKV, loads: Sequence[tuple[int, int, int]], block_at: Callable[[int, int], torch.Tensor]
) -> None:
    """``loads``: (vLLM block id, agent page, index); ``block_at(page, index)`` is the
    agent block's bytes (a view of the mapped region)."""
    for block_id, page, index in loads:
        kv.write(block_id, block_at(page, index))


def save_blocks(
    kv: PagedKV, block_ids: Sequence[int], slots: Sequence[tuple[int, int]],
    block_at: Callable[[int, int], torch.Tensor],
) -> None:  # fmt: skip
    """Copy vLLM's ``block_ids`` into the leased agent ``slots`` (same order)."""
    for block_id, (page, index) in zip(block_ids, slots, strict=True):
        kv.read(block_id, block_at(page, index))
