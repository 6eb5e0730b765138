"""Reading a cached value without copying it: its blocks mapped into one private range.

A value's blocks (head first) sit in slots scattered over the agent's shared
region. ``map_value`` reserves one anonymous range of ``len(blocks) * block_bytes``
and maps each run of adjacent slots over it from the region's memfd, in value
order, ``MAP_PRIVATE``: the value's bytes are then contiguous in this process, read
straight from the shared pages, and a write by the caller copies the page it
touches (copy-on-write) instead of changing what other processes read.

Invariants the caller keeps: a private mapping reads through to the shared page
until its first write, so every block mapped must stay pinned while the mapping
lives (``MappedValue`` reports when it dies, through ``on_free``); the head block,
which the caller unpins at once, is made private here by rewriting its bytes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from collections.abc import Callable

import torch

from kvmarina.agent.memory import libc

PAGE = mmap.PAGESIZE
_libc = libc
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)


class ViewError(OSError):
    """The value cannot be mapped (the caller copies it instead)."""


def mappable(block_bytes: int, offsets: list[int]) -> bool:
    """Blocks and their region offsets on page boundaries, as ``mmap`` needs."""
    return block_bytes % PAGE == 0 and all(off % PAGE == 0 for off in offsets)


def runs(offsets: list[int], block_bytes: int) -> list[tuple[int, int, int]]:
    """(first block, region offset, blocks) for each run of adjacent slots."""
    out: list[tuple[int, int, int]] = []
    for i, off in enumerate(offsets):
        if out and out[-1][1] + out[-1][2] * block_bytes == off:
            first, start, n = out[-1]
            out[-1] = (first, start, n + 1)
        else:
            out.append((i, off, 1))
    return out


def map_value(
    fd: int,
    offsets: list[int],
    block_bytes: int,
    data_offset: int,
    nbytes: int,
    on_free: Callable[[], None],
) -> tuple[torch.Tensor, mmap.mmap]:
    """A uint8 tensor of the value's ``nbytes`` (from ``data_offset`` of the head),
    backed by private mappings of its blocks, and the mapping. ``on_free`` runs once
    no tensor uses the mapping any more (from the garbage collector: it must only
    queue work); hold the mapping weakly, or it is never freed."""
    if not mappable(block_bytes, offsets):
        raise ViewError(errno.EINVAL, "blocks are not page-aligned")
    size = len(offsets) * block_bytes
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor  # a live export would keep the mapping from being closed later
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    for first, off, n in runs(offsets, block_bytes):
        at = base + first * block_bytes
        got = _libc.mmap(at, n * block_bytes, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, off)
        if got == _MAP_FAILED or got != at:
            err = ctypes.get_errno()
            mm.close()
            raise ViewError(err, f"mapping a cached value failed: {os.strerror(err)}")
    # the head is unpinned by the caller right after: copy its pages privately now
    head = memoryview(mm)[: min(block_bytes, data_offset + nbytes)]
    head[:] = bytes(head)
    head.release()
    weakref.finalize(mm, on_free)
    return torch.frombuffer(mm, dtype=torch.uint8, offset=data_offset, count=nbytes), mm
