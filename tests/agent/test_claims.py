"""Claims: which engine of the node is computing a block, so others wait instead."""

from __future__ import annotations

from kvmarina.agent.node import claims as claims_mod
from kvmarina.agent.node.claims import ClaimTable
from kvmarina.agent.node.index import Key

from .test_pool import make_pool, session


def keys(*ns: int) -> list[Key]:
    return [("s", bytes([n]) * 16) for n in ns]


def consistent(t: ClaimTable) -> bool:
    flat = {k: s for s, ks in t.by_session.items() for k in ks}
    return flat == t.owner and all(t.by_session.values())


def test_a_block_is_one_sessions_to_compute_and_others_see_it_pending() -> None:
    t = ClaimTable()
    t.claim(1, keys(0, 1, 2, 3))
    assert t.pending(2, keys(0, 1, 2, 3, 4)) == 4
    assert t.pending(1, keys(0, 1, 2)) == 0  # its own claims are not pending for it
    assert t.pending(2, keys(9, 0)) == 0  # counted from the first key only
    t.claim(2, keys(2, 3, 4, 5))  # 2 and 3 stay session 1's
    assert t.owner[keys(2)[0]] == 1 and t.owner[keys(4)[0]] == 2
    t.claim(1, keys(0, 1))  # claiming again changes nothing
    assert len(t) == 6 and consistent(t)


def test_claims_end_on_commit_on_unclaim_and_when_the_session_closes() -> None:
    t = ClaimTable()
    t.claim(1, keys(0, 1, 2))
    t.claim(2, keys(3, 4))
    t.settle(keys(0)[0])
    t.settle(keys(7)[0])  # never claimed: nothing to do
    assert t.pending(2, keys(0, 1, 2)) == 0 and t.pending(2, keys(1, 2)) == 2
    t.unclaim(2, keys(1, 3))  # only its own claims go
    assert keys(1)[0] in t.owner and keys(3)[0] not in t.owner
    t.drop_session(1)
    assert t.owner == {keys(4)[0]: 2} and consistent(t)
    t.unclaim(2, keys(4))
    assert not t.owner and not t.by_session


def test_a_session_claims_no_more_than_its_bound(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(claims_mod, "MAX_CLAIMS_PER_SESSION", 3)
    t = ClaimTable()
    t.claim(1, keys(0, 1, 2, 3, 4))
    assert len(t) == 3 and t.pending(2, keys(0, 1, 2, 3)) == 3


def test_the_pool_reports_blocks_in_flight_past_a_lookup_and_commits_settle_them() -> None:
    pool = make_pool(device_pages=4)
    a, b = session(pool, "chat"), session(pool, "chat")
    hs = [bytes([n + 1]) * 16 for n in range(6)]
    assert pool.lookup(a, hs[:4]) == [] and pool.in_flight(a, hs[:4], claim=True) == 0
    assert pool.lookup(b, hs) == [] and pool.in_flight(b, hs, claim=True) == 4
    (slot,) = pool.lease(a, 1)
    pool.commit(a, slot, hs[0])
    hits = pool.lookup(b, hs)
    assert len(hits) == 1 and pool.in_flight(b, hs[1:], claim=True) == 3
    pool.unclaim(a, hs[1:4])  # a's request ended before computing them: b's to compute
    assert pool.in_flight(b, hs[1:], claim=True) == 0
    assert pool.in_flight(a, hs[1:], claim=False) == 5 and pool.summary()["claimed_blocks"] == 5
    pool.close_session(b)
    assert pool.in_flight(a, hs[1:], claim=False) == 0 and len(pool.claims) == 0
