"""Moving blocks between tiers: device room made by moving victims down to host
memory (or dropping them), and host hits brought back up for a lookup.

Functions over a ``Pool`` (as ``blockops`` is): they change blocks' slots and
tiers through the pool's index, usage table and ``remove``, and publish ``moved``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvmarina.agent.node.budgets import may_take_from
from kvmarina.agent.node.index import Block, Slot
from kvmarina.agent.node.session import PoolFull, Session
from kvmarina.agent.node.slots import SlotPool

if TYPE_CHECKING:
    from kvmarina.agent.node.pool import Pool


def reclaim_slot(pool: Pool, sess: Session, slots: SlotPool) -> Slot:
    """Free a device slot usable by ``slots`` by moving or dropping a victim."""
    for _ in range(64):  # each round frees one block; pages free when emptied
        victim = next(
            (b for b in pool.index.victims("device") if may_take_from(pool, sess, b.owner)),
            None,
        )
        if victim is None:
            break
        evict(pool, victim)
        slot = slots.alloc()
        if slot is not None:
            return slot
    raise PoolFull(
        f"no free KV block for serving {sess.serving}: every block is "
        "in use by running requests or protected by budgets"
    )


def evict(pool: Pool, block: Block) -> None:
    """Make room in the device tier: move ``block`` (unpinned) to host memory,
    dropping host victims for room; with no host tier or no room, remove it."""
    store = pool.storage
    scope, h = block.key
    if store.host_region is not None:
        host = store.slots(scope, block.block_bytes, "host")
        hslot = host.alloc()
        for _ in range(64):  # host full: drop host victims until a slot frees
            if hslot is not None:
                break
            hvictim = next(pool.index.victims("host"), None)
            if hvictim is None:
                break
            pool.remove(hvictim, evicted=True)
            hslot = host.alloc()
        if hslot is not None:
            store.copy(
                store.bytes_of(scope, "device", block.slot, block.block_bytes),
                store.bytes_of(scope, "host", hslot, block.block_bytes),
            )
            store.slots(scope, block.block_bytes, "device").free(block.slot)
            pool.usage.block_out(block.owner)  # budgets count device-tier blocks only
            block.slot = hslot
            pool.index.move(block, "host")
            pool.stats["offloaded"] += 1
            pool.events.publish("moved", (h,), "host")
            return
    pool.remove(block, evicted=True)


def promote(pool: Pool, sess: Session, block: Block) -> bool:
    """Copy a host-tier block the lookup has just pinned back into the device tier.

    With the device full, a victim must move down to host memory just as
    this block leaves it: the block's bytes are staged first so the victim
    can take its host slot (a swap), instead of pushing a third block out.
    On failure (False) the lookup's pin is released here."""
    store = pool.storage
    scope, size = block.key[0], block.block_bytes
    device, host = store.slots(scope, size, "device"), store.slots(scope, size, "host")
    src = store.bytes_of(scope, "host", block.slot, size)
    slot = device.alloc()
    if slot is not None:
        store.copy(src, store.bytes_of(scope, "device", slot, size))
        host.free(block.slot)
    else:
        staged = src.clone()
        host.free(block.slot)
        try:
            slot = reclaim_slot(pool, sess, device)
        except PoolFull:
            _back_to_host(pool, sess, block, staged)
            return False
        store.copy(staged, store.bytes_of(scope, "device", slot, size))
    block.slot = slot
    pool.index.move(block, "device")  # pinned by the lookup: no order to change
    pool.usage.block_in(block.owner)
    pool.stats["promoted"] += 1
    pool.events.publish("moved", (block.key[1],), "device")
    return True


def _back_to_host(pool: Pool, sess: Session, block: Block, staged: torch.Tensor) -> None:
    """A promotion that found no device room: put the staged bytes back in
    host memory (or, if a victim took the last host slot, remove the block),
    and release the lookup's pin."""
    store = pool.storage
    scope = block.key[0]
    hslot = store.slots(scope, block.block_bytes, "host").alloc()
    pool.unpin(sess, block)
    if hslot is None:
        pool.remove(block, evicted=True, slot_freed=True)
    else:
        store.bytes_of(scope, "host", hslot, block.block_bytes).copy_(staged)
        block.slot = hslot
