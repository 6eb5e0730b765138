"""Who may take device room from whom: the servings' budgets (min, max, priority).

A serving's ``min`` is guaranteed, its ``max`` a hard cap (checked where it
leases); between them it may take unpinned blocks, or ask for released ones, of
servings with no higher priority that are above their own minimum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmarina.agent.node.session import Budget, Session

if TYPE_CHECKING:
    from kvmarina.agent.node.pool import Pool


def may_take_from(pool: Pool, requester: Session, owner: str) -> bool:
    """May ``requester`` take a block that ``owner`` holds, by the budgets?"""
    me = requester.serving
    if owner == me:
        return True
    ob = pool.budgets.get(owner, Budget())
    if pool.usage[owner] <= ob.min_slots:
        return False  # the owner's guaranteed minimum
    if pool.usage[me] < requester.budget.min_slots:
        return True  # getting back to my own guaranteed minimum
    return ob.priority <= requester.budget.priority


def reclaim_targets(pool: Pool, sess: Session, n: int) -> dict[int, int]:
    """Sessions to ask to release blocks so that ``sess`` can lease ``n``:
    session id -> how many to ask for. Only holders the budgets let ``sess``
    take from, lowest priority first; blocks another session also pins are
    not counted (releasing them would free nothing)."""
    asked: dict[int, int] = {}
    # Any scope: pages are shared by all scopes, and a page another scope
    # empties comes back to the free queue for ours.
    others = [s for s in pool.sessions.values() if s.id != sess.id]
    others.sort(key=lambda s: pool.budgets.get(s.serving, Budget()).priority)
    want = n
    for other in others:
        if want <= 0:
            break
        if not may_take_from(pool, sess, other.serving):
            continue
        held = len(other.leased) + sum(
            1
            for key, k in other.pins.items()
            if (b := pool.index.get(key)) is not None and b.tier == "device" and b.refs == k
        )
        if held:
            asked[other.id] = min(held, want)
            want -= asked[other.id]
    return asked
