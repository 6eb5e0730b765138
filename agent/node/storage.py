"""Where the pool's bytes live: regions, pages, slots, and views of a block's bytes.

The device tier is one free-page queue shared by every scope, with one region
per scope that gets a page's memory only while it uses the page (``FreePages``);
the host tier is one region for all scopes. A ``SlotPool`` per (scope, block
size, tier) cuts pages into block slots. ``Storage`` knows bytes and places,
not blocks' meaning: which slot a block holds, pins and budgets are the pool's.
"""

from __future__ import annotations

import torch

from kvmarina.agent.memory import CpuRegion, Region, make_region
from kvmarina.agent.node.index import Block, Slot
from kvmarina.agent.node.session import PoolError
from kvmarina.agent.node.slots import FreePages, SlotPool


class Storage:
    """Regions, free pages and slot pools of one node's pool (one thread, no locks).

    Invariants: a device page's memory is resident in at most one scope's region
    (it is released there before another scope's slot pool gets the page);
    ``slot_pools`` holds one pool per (scope, block size, tier), and every device
    slot pool's scope has its region; ``views`` caches each shared-RAM region's
    bytes once (None where the region is device memory).
    """

    def __init__(
        self, *, node: str, backend: str, page_size: int, device_pages: int, host_pages: int
    ) -> None:
        self.node, self.backend, self.page_size = node, backend, page_size
        self.device = FreePages(device_pages, self._drop_page)
        self.host = FreePages(host_pages)  # one region for every scope: never dropped
        self.regions: dict[str, Region] = {}
        self.host_region: CpuRegion | None = (
            CpuRegion(f"{node}-host", host_pages * page_size) if host_pages else None
        )
        self.slot_pools: dict[tuple[str, int, str], SlotPool] = {}
        # (scope, tier) -> the region's bytes, where it is shared RAM (else None)
        self.views: dict[tuple[str, str], memoryview | None] = {}

    def region(self, scope: str) -> Region:
        """``scope``'s device region (made on first use: every page index, none resident)."""
        if scope not in self.regions:
            self.regions[scope] = make_region(
                self.backend,
                f"{self.node}-{scope}".replace("/", "-"),
                self.device.n_pages * self.page_size,
            )
        return self.regions[scope]

    def slots(self, scope: str, block_bytes: int, tier: str) -> SlotPool:
        """The slot pool that cuts ``tier``'s pages into ``block_bytes`` slots for ``scope``."""
        key = (scope, block_bytes, tier)
        if key not in self.slot_pools:
            pages = self.device if tier == "device" else self.host
            per_page = self.page_size // block_bytes
            if per_page < 1:
                raise PoolError(
                    f"a block of {block_bytes} bytes does not fit a page of "
                    f"{self.page_size} bytes; raise the pool's pageSize"
                )
            if tier == "device":
                self.region(scope)  # made before the first page is written
            self.slot_pools[key] = SlotPool(pages, per_page, scope if tier == "device" else "")
        return self.slot_pools[key]

    def _drop_page(self, scope: str, page: int) -> None:
        """A free device page moves to another scope: its memory in ``scope``'s region
        goes back first (a memfd reads zeros there from then on)."""
        region = self.regions.get(scope)
        if region is not None:
            region.release(page * self.page_size, self.page_size)

    def bytes_of(self, scope: str, tier: str, slot: Slot, block_bytes: int) -> torch.Tensor:
        """A slot's bytes, as a view of its region."""
        region = self.region(scope) if tier == "device" else self.host_region
        assert region is not None
        off = slot.page * self.page_size + slot.index * block_bytes
        return region.tensor()[off : off + block_bytes]

    def cpu_view(self, scope: str, tier: str) -> memoryview | None:
        """The whole region of ``scope`` in ``tier`` as bytes when it is shared RAM
        (made once; slicing it costs far less than slicing a tensor), else None."""
        key = (scope, "device") if tier == "device" else ("", "host")
        if key not in self.views:
            region = self.region(scope) if tier == "device" else self.host_region
            self.views[key] = region.view() if isinstance(region, CpuRegion) else None
        return self.views[key]

    def host_view(self, block: Block) -> memoryview:
        """A block's bytes readable on the CPU: a view of shared RAM, or a copy
        out of device memory on CUDA."""
        scope, size = block.key[0], block.block_bytes
        view = self.cpu_view(scope, block.tier)
        if view is not None:
            off = block.slot.page * self.page_size + block.slot.index * size
            return view[off : off + size]
        data = self.bytes_of(scope, block.tier, block.slot, size)
        if data.device.type != "cpu":
            data = data.cpu()
        return data.numpy().data

    def write_block(self, scope: str, slot: Slot, size: int, data: bytes) -> None:
        """Fill a leased device slot from bytes received on the CPU (a pulled block)."""
        dst = self.bytes_of(scope, "device", slot, size)
        if dst.device.type == "cpu":
            dst.numpy()[:] = memoryview(data).cast("B")
        else:
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move one block's bytes between tiers. On CUDA through the kernels'
        block copy (one row each side); shared RAM is a plain memory copy."""
        if self.backend == "cuda":
            from kvmarina.kernels.dispatch import copy_blocks

            zero = torch.zeros(1, dtype=torch.int64)
            copy_blocks(src.view(1, -1), dst.view(1, -1), zero.to(src.device), zero.to(dst.device))
        else:
            dst.copy_(src)
