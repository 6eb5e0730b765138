"""The pool's invariants, checked by a full scan (the state-machine test runs it
after every step; ``Pool.check_invariants``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmarina.agent.node.index import TIERS, InvariantError, Key, Slot

if TYPE_CHECKING:
    from kvmarina.agent.node.pool import Pool


def check_pool(pool: Pool) -> None:
    """Raise ``InvariantError`` naming the first of ``Pool``'s invariants (its class
    docstring) that does not hold. A full scan: for tests and debugging."""
    pool.index.check()
    tiers = {"device": pool.storage.device, "host": pool.storage.host}
    held: dict[str, set[int]] = {tier: set() for tier in TIERS}
    for (_, _, tier), sp in pool.storage.slot_pools.items():
        sp.check()
        if held[tier] & sp.used.keys():
            raise InvariantError(f"a {tier} page is held by two slot pools")
        held[tier].update(sp.used)
    for tier, pages in tiers.items():
        pages.check()
        if held[tier] != pages.handed_out():
            raise InvariantError(f"{tier} pages handed out and pages cut into slots differ")

    # every allocated slot is exactly one block's or one lease's
    taken: dict[tuple[str, int, str], dict[Slot, str]] = {}

    def take(where: tuple[str, int, str], slot: Slot, who: str) -> None:
        mine = taken.setdefault(where, {})
        if slot in mine:
            raise InvariantError(f"slot {slot} is both {mine[slot]}'s and {who}'s")
        mine[slot] = who

    usage: dict[str, int] = {}
    for key, b in pool.index.blocks.items():
        take((key[0], b.block_bytes, b.tier), b.slot, f"block {key[1].hex()}")
        if b.tier == "device":
            usage[b.owner] = usage.get(b.owner, 0) + 1
    pinned: dict[Key, int] = {}
    for s in pool.sessions.values():
        for slot in s.leased:
            take((s.scope, s.block_bytes, "device"), slot, f"session {s.id}'s lease")
        usage[s.serving] = usage.get(s.serving, 0) + len(s.leased)
        for key, n in s.pins.items():
            if n <= 0 or key not in pool.index.blocks:
                raise InvariantError(f"session {s.id} pins {key[1].hex()} {n} times")
            pinned[key] = pinned.get(key, 0) + n
    for where in taken.keys() | pool.storage.slot_pools.keys():
        slots = pool.storage.slot_pools.get(where)
        allocated = slots.allocated() if slots is not None else set()
        if allocated != taken.get(where, {}).keys():
            raise InvariantError(
                f"{where[2]} slots of {where[0]}: allocated and held by a block "
                "or a lease differ (a leak, or a slot used twice)"
            )

    for serving in usage.keys() | set(pool.usage):
        if pool.usage[serving] != usage.get(serving, 0):
            raise InvariantError(
                f"usage of {serving} is {pool.usage[serving]}; "
                f"it leases and owns {usage.get(serving, 0)}"
            )
    for key, n in pinned.items():
        if pool.index.blocks[key].refs < n:
            raise InvariantError(f"block {key[1].hex()} has fewer refs than session pins")

    claims = pool.claims
    flat = {k: sid for sid, ks in claims.by_session.items() for k in ks}
    if flat != claims.owner or not all(claims.by_session.values()):
        raise InvariantError("the claim table's two maps disagree")
    if not claims.by_session.keys() <= pool.sessions.keys():
        raise InvariantError("a closed session still claims blocks")
