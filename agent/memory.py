"""Memory regions the agent owns and lends: shared RAM (memfd) or exportable CUDA memory.

One region per sharing scope: an engine receives the file descriptor of its own
scope's region only, never one covering the whole pool, so no engine can map
another tenant's KV. A region is sized for the whole device budget but is
sparse: a page costs memory once that scope has used it, and ``release`` gives
it back (``MADV_REMOVE`` punches the page out of the memfd, so the next owner
of that page index in *this* region reads zeros) when the page index moves to
another scope (``slots.FreePages``); all regions together hold at most the
tier's pages.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any, Protocol

import torch


class RegionError(RuntimeError):
    pass


class Region(Protocol):
    """Invariant: ``size`` bytes, page-aligned; ``fd`` maps the same bytes in another process."""

    name: str
    size: int
    fd: int
    kind: str

    def tensor(self) -> torch.Tensor: ...

    def release(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class CpuRegion:
    """A memfd the agent and the engines of one scope map (``MAP_SHARED``)."""

    kind = "cpu"

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        try:
            self.fd = os.memfd_create(f"kvmarina-{name}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise RegionError(f"cannot create a {size}-byte shared region: {exc.strerror}") from exc
        self._tensor = torch.frombuffer(self._mm, dtype=torch.uint8)

    def tensor(self) -> torch.Tensor:
        return self._tensor

    def view(self) -> memoryview:
        return memoryview(self._mm)

    def release(self, offset: int, length: int) -> None:
        self._mm.madvise(mmap.MADV_REMOVE, offset, length)

    def close(self) -> None:
        try:
            del self._tensor
            self._mm.close()
        except BufferError:
            pass  # a tensor view is still alive somewhere; the OS frees it at exit
        os.close(self.fd)


libc = ctypes.CDLL(None, use_errno=True)  # this process's C library (mmap, mincore)
_OS_PAGE = mmap.PAGESIZE


def backed(addr: int, size: int) -> bool:
    """Every OS page of ``[addr, addr + size)`` in a shared mapping has memory behind
    it already (``mincore``), so writing there through the mapping takes no page
    fault; ``False`` when unsure. A pull writes into a span that is not backed
    with ``pwrite``, which fills fresh pages faster than faulting them in."""
    start = addr - addr % _OS_PAGE
    n = -(-(addr + size - start) // _OS_PAGE)
    vec = (ctypes.c_ubyte * n)()
    mincore = getattr(libc, "mincore", None)
    if mincore is None or mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * _OS_PAGE), vec):
        return False
    return all(v & 1 for v in bytes(vec))


def map_region(fd: int, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Client side: map a region received over the socket, once."""
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


class CudaRegion:
    """Device memory created exportable (CUDA VMM, POSIX fd handle).

    ``cuMemCreate`` with ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``, reserved and
    mapped into this process (``cuMemAddressReserve``/``cuMemMap``/``cuMemSetAccess``)
    and exported with ``cuMemExportToShareableHandle``; an engine imports the fd
    with ``cuMemImportFromShareableHandle`` and maps it the same way. Imports
    ``cuda.bindings`` only when constructed, so this module loads without a GPU.
    """

    kind = "cuda"

    def __init__(self, name: str, size: int, device: int = 0) -> None:
        cu = _driver(device)
        self._cu = cu
        self.name, self.device = name, device
        prop = _alloc_prop(cu, device)
        gran = _check(
            cu.cuMemGetAllocationGranularity(
                prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            )
        )
        self.size = -(-size // int(gran)) * int(gran)
        self._handle = _check(cu.cuMemCreate(self.size, prop, 0))
        self._ptr = _map_handle(cu, self._handle, self.size, device)
        self.fd = int(
            _check(
                cu.cuMemExportToShareableHandle(
                    self._handle,
                    cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    0,
                )
            )
        )

    def tensor(self) -> torch.Tensor:
        return _device_tensor(int(self._ptr), self.size, self.device)

    def release(self, offset: int, length: int) -> None:
        # Physical memory stays committed for the region's life; scope isolation
        # comes from separate regions, so a reused page index reads this scope's
        # own earlier bytes at worst.
        return None

    def close(self) -> None:
        cu = self._cu
        cu.cuMemUnmap(self._ptr, self.size)
        cu.cuMemAddressFree(self._ptr, self.size)
        cu.cuMemRelease(self._handle)
        os.close(self.fd)


class CudaMapping:
    """Client side of a CUDA region: the exported allocation imported from its fd
    (``cuMemImportFromShareableHandle``) and mapped into this process once."""

    def __init__(self, fd: int, size: int, device: int = 0) -> None:
        cu = _driver(device)
        self._cu, self.size, self.device = cu, size, device
        kind = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._handle = _check(cu.cuMemImportFromShareableHandle(fd, kind))
        self._ptr = _map_handle(cu, self._handle, size, device)

    def tensor(self) -> torch.Tensor:
        return _device_tensor(int(self._ptr), self.size, self.device)

    def close(self) -> None:
        cu = self._cu
        cu.cuMemUnmap(self._ptr, self.size)
        cu.cuMemAddressFree(self._ptr, self.size)
        cu.cuMemRelease(self._handle)


def _driver(device: int) -> Any:
    """The CUDA driver bindings, with the device's primary context (torch's) current."""
    try:
        from cuda.bindings import driver as cu
    except ImportError as exc:
        raise RegionError(
            "the cuda backend needs cuda-bindings (pip install 'kvmarina[gpu]') and a CUDA GPU"
        ) from exc
    _check(cu.cuInit(0))
    dev = _check(cu.cuDeviceGet(device))
    _check(cu.cuCtxSetCurrent(_check(cu.cuDevicePrimaryCtxRetain(dev))))
    return cu


def _alloc_prop(cu: Any, device: int) -> Any:
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    prop.requestedHandleTypes = (
        cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    )
    return prop


def _map_handle(cu: Any, handle: Any, size: int, device: int) -> Any:
    """Reserve a virtual range, map ``handle`` there, grant read/write to ``device``."""
    ptr = _check(cu.cuMemAddressReserve(size, 0, 0, 0))
    _check(cu.cuMemMap(ptr, size, 0, handle, 0))
    loc = cu.CUmemLocation()
    loc.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    loc.id = device
    access = cu.CUmemAccessDesc()
    access.location = loc
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    _check(cu.cuMemSetAccess(ptr, size, [access], 1))
    return ptr


def _check(result: object) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # CUDA_SUCCESS
        raise RegionError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _device_tensor(ptr: int, size: int, device: int) -> torch.Tensor:
    """A torch uint8 tensor over device memory we own (via __cuda_array_interface__)."""

    class _Buf:
        __cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }

    return torch.as_tensor(_Buf(), device=f"cuda:{device}")


def make_region(kind: str, name: str, size: int) -> Region:
    if kind == "cpu":
        return CpuRegion(name, size)
    if kind == "cuda":
        return CudaRegion(name, size)
    raise RegionError(f"unknown memory backend {kind!r}: use cpu or cuda")
