"""The pool's policies, in process: eviction order, budgets, priorities, host tier, events."""

from __future__ import annotations

import pytest

from kvmarina.agent.node.credentials import CredentialError, CredentialStore, Identity
from kvmarina.agent.node.pool import Budget, Pool, PoolError, PoolFull, Session

BB = 4096  # block bytes; pages of 4 blocks


def make_pool(device_pages: int = 2, host_pages: int = 0, policy: str = "lru") -> Pool:
    return Pool(
        node="n",
        backend="cpu",
        page_size=4 * BB,
        device_pages=device_pages,
        host_pages=host_pages,
        policy=policy,
    )


def session(pool: Pool, serving: str, budget: Budget | None = None, ns: str = "a") -> Session:
    return pool.open_session(Identity(serving, ns, "namespace"), BB, budget or Budget())


def fill(pool: Pool, s: Session, tags: list[int]) -> list[bytes]:
    """Lease, write, commit and unpin one block per tag; returns the hashes."""
    hashes = []
    for tag in tags:
        (slot,) = pool.lease(s, 1)
        off = slot.page * pool.page_size + slot.index * BB
        pool.region(s.scope).tensor()[off : off + BB].fill_(tag)
        h = bytes([tag]) * 16
        pool.commit(s, slot, h)
        pool.release(s, [h])
        hashes.append(h)
    return hashes


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_order(policy: str) -> None:
    pool = make_pool(device_pages=1, policy=policy)  # room for 4 blocks
    s = session(pool, "chat")
    h = fill(pool, s, [1, 2, 3, 4])
    for _ in range(3):  # block 1 is used often and recently
        pool.lookup(s, [h[0]])
        pool.release(s, [h[0]])
    pool.lookup(s, [h[2]])  # block 3 is pinned: never a victim
    fill(pool, s, [5])
    remaining = {b.key[1][0] for b in pool.index.blocks.values()}
    # LRU drops block 2 (least recently used); LFU drops 2 as well (fewest uses, oldest)
    assert remaining == {1, 3, 4, 5}
    fill(pool, s, [6])
    remaining = {b.key[1][0] for b in pool.index.blocks.values()}
    assert 3 in remaining and 1 in remaining and len(remaining) == 4


def test_pinned_blocks_are_never_evicted() -> None:
    pool = make_pool(device_pages=1)
    s = session(pool, "chat")
    h = fill(pool, s, [1, 2, 3, 4])
    assert len(pool.lookup(s, h)) == 4  # all pinned
    with pytest.raises(PoolFull, match="in use by running requests"):
        pool.lease(s, 1)
    assert len(pool.index) == 4


def test_budgets_min_max_priority() -> None:
    pool = make_pool(device_pages=2)  # 8 blocks
    low = session(pool, "batch", Budget(min_slots=2, max_slots=8, priority=10))
    high = session(pool, "chat", Budget(min_slots=2, max_slots=8, priority=100))
    fill(pool, low, [1, 2, 3, 4, 5, 6])
    fill(pool, high, [11, 12])
    # high (priority 100) takes low's blocks above low's minimum of 2
    fill(pool, high, [13, 14, 15, 16])
    assert pool.usage["a/batch"] == 2 and pool.usage["a/chat"] == 6
    # low may recycle its own cached blocks, but never take high's (higher priority)
    assert len(pool.lease(low, 2)) == 2
    with pytest.raises(PoolFull):
        pool.lease(low, 1)
    with pytest.raises(PoolFull, match="max of 1"):
        capped = session(pool, "capped", Budget(max_slots=1))
        pool.lease(capped, 2)


def test_guaranteed_minimum_beats_priority() -> None:
    pool = make_pool(device_pages=1)
    big = session(pool, "big", Budget(priority=1000))
    fill(pool, big, [1, 2, 3, 4])
    small = session(pool, "small", Budget(min_slots=2, priority=1))
    fill(pool, small, [7, 8])  # its minimum is always grantable
    assert pool.usage["a/small"] == 2 and pool.usage["a/big"] == 2


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_host_tier_round_trip(policy: str) -> None:
    pool = make_pool(device_pages=1, host_pages=1, policy=policy)
    s = session(pool, "chat")
    h = fill(pool, s, [1, 2, 3, 4, 5])  # block 1 moves to host
    assert pool.index.get((s.scope, h[0])).tier == "host"  # type: ignore[union-attr]
    hits = pool.lookup(s, [h[0]])
    assert hits[0].tier == "device"
    off = hits[0].offset(pool.page_size, BB)
    data = pool.region(s.scope).tensor()[off : off + BB]
    assert int(data.min()) == int(data.max()) == 1  # bytes survived the round trip
    assert pool.stats["offloaded"] >= 1 and pool.stats["promoted"] == 1


def test_scopes_are_isolated_and_same_hash_dedupes() -> None:
    pool = make_pool()
    a1, a2 = session(pool, "chat", ns="a"), session(pool, "code", ns="a")
    b = session(pool, "other", ns="b")
    h = fill(pool, a1, [9])
    assert len(pool.lookup(a2, h)) == 1 and pool.lookup(b, h) == []
    (slot,) = pool.lease(a2, 1)
    loc = pool.commit(a2, slot, h[0])  # the same block again: the first copy is kept
    assert (loc.page, loc.index) == (
        pool.index.get((a1.scope, h[0])).slot.page,  # type: ignore[union-attr]
        pool.index.get((a1.scope, h[0])).slot.index,
    )  # type: ignore[union-attr]


def test_release_errors_change_nothing() -> None:
    pool = make_pool()
    s = session(pool, "chat")
    (slot,) = pool.lease(s, 1)
    with pytest.raises(PoolError, match="not pinned"):
        pool.release(s, [b"\x01" * 16])
    other = session(pool, "x")
    with pytest.raises(PoolError, match="not leased"):
        pool.release_slots(other, [slot])
    assert slot in s.leased
    pool.close_session(s)
    assert pool.usage["a/chat"] == 0 and pool.device.used == 0


def test_credentials_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.yaml"
    p.write_text("servings:\n  - {name: a, token: x}\n  - {name: b, token: x}\n")
    with pytest.raises(CredentialError, match="share one token"):
        CredentialStore.load(p)
    p.write_text("servings:\n  - {name: a, token: x, scope: world}\n")
    with pytest.raises(CredentialError, match="scope 'world'"):
        CredentialStore.load(p)
    p.write_text("servings:\n  - {name: a}\n")
    with pytest.raises(CredentialError, match="lacks"):
        CredentialStore.load(p)


def test_credentials_reload_when_the_mounted_file_changes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "secret"
    d.mkdir()
    (d / "credentials.yaml").write_text("servings:\n  - {name: a, namespace: n, token: ta}\n")
    (d / ".hidden.yaml").write_text("servings:\n  - {name: x, token: tx}\n")
    store = CredentialStore.load(d)
    assert store.identify("ta") == Identity("a", "n", "namespace")
    assert store.identify("tx") is None and store.identify("tb") is None
    assert not store.refresh()  # unchanged: nothing re-read
    (d / "more.json").write_text('{"servings": [{"name": "b", "token": "tb", "scope": "none"}]}')
    assert store.refresh()
    assert store.identify("tb") == Identity("b", "default", "none")
    # a broken update keeps the credentials that worked
    (d / "more.json").write_text("{not json")
    assert not store.refresh()
    assert store.identify("ta") is not None and store.identify("tb") is not None


def test_host_hit_without_device_room_stays_on_host_intact() -> None:
    pool = make_pool(device_pages=1, host_pages=1)
    s = session(pool, "chat")
    h = fill(pool, s, [1, 2, 3, 4, 5])  # block 1 moved to host
    assert len(pool.lookup(s, h[1:])) == 4  # every device block pinned
    assert pool.lookup(s, [h[0]]) == []  # no room: a miss, not a crash or a loss
    block = pool.index.get((s.scope, h[0]))
    assert block is not None and block.tier == "host" and block.refs == 0
    off = block.slot.page * pool.page_size + block.slot.index * BB
    data = pool.host_region.tensor()[off : off + BB]  # type: ignore[union-attr]
    assert int(data.min()) == int(data.max()) == 1
    pool.release(s, h[1:])
    assert pool.lookup(s, [h[0]])[0].tier == "device"  # room again: promoted


def test_names_repeated_in_a_release_are_checked_as_a_whole() -> None:
    pool = make_pool()
    s = session(pool, "chat")
    (h,) = fill(pool, s, [1])
    a, b = pool.lease(s, 2)
    pool.lookup(s, [h])  # one pin
    with pytest.raises(PoolError, match="not pinned 2 times"):
        pool.release(s, [h, h])
    with pytest.raises(PoolError, match="named twice"):
        pool.release_slots(s, [a, b, a])
    assert s.pins[(s.scope, h)] == 1 and s.leased == {a, b} and pool.usage["a/chat"] == 3
    pool.lookup(s, [h])
    pool.release(s, [h, h])  # two pins, two releases
    assert not s.pins


def test_budgets_are_checked_and_overcommitted_minimums_reported() -> None:
    pool = make_pool(device_pages=2)
    with pytest.raises(PoolError, match="need 0 <= min"):
        session(pool, "bad", Budget(min_slots=5, max_slots=4))
    session(pool, "one", Budget(min_slots=6))  # 2 pages of 4 blocks
    assert pool.summary()["reserved_pages"] == 2
    session(pool, "two", Budget(min_slots=1))  # still registers; reported
    assert pool.summary()["reserved_pages"] == 3


def test_each_tier_keeps_its_own_eviction_order() -> None:
    pool = make_pool(device_pages=1, host_pages=1)  # 4 + 4 blocks
    s = session(pool, "chat")
    h = fill(pool, s, list(range(1, 13)))  # 1-4 dropped, 5-8 on host, 9-12 on device
    tiers = {b.key[1][0]: b.tier for b in pool.index.blocks.values()}
    assert tiers == {**{i: "host" for i in range(5, 9)}, **{i: "device" for i in range(9, 13)}}
    for tier in ("device", "host"):
        keys = set(pool.index.orders[tier].candidates())
        assert keys == {b.key for b in pool.index.blocks.values() if b.tier == tier}
    pool.lookup(s, [h[8]])  # pinned: in no order
    assert all(
        (s.scope, h[8]) not in set(pool.index.orders[t].candidates()) for t in ("device", "host")
    )


def test_free_pages_prefer_the_home_that_used_them_then_bare_then_others() -> None:
    from kvmarina.agent.node.slots import FreePages

    dropped: list[tuple[str, int]] = []
    pages = FreePages(3, lambda home, page: dropped.append((home, page)))
    a0, a1 = pages.take("a"), pages.take("a")
    assert a0 is not None and a1 is not None
    pages.give(a0)
    pages.give(a1)
    assert pages.resident("a") == 2 and pages.free == 3
    assert pages.take("a") == a0 and dropped == []  # its own memory, nothing to drop
    b0 = pages.take("b")  # a bare page before anyone's memory
    assert b0 not in (a0, a1) and dropped == []
    assert pages.take("b") == a1 and dropped == [("a", a1)]  # taken over: a's copy dropped
    assert pages.take("c") is None and pages.free == 0
    with pytest.raises(ValueError, match="not handed out"):
        pages.give(a1 + 10)


def test_a_freed_page_stays_with_its_scope_and_is_zeroed_before_another_scope_gets_it() -> None:
    pool = make_pool(device_pages=1)
    a, b = session(pool, "chat", ns="a"), session(pool, "other", ns="b")
    fill(pool, a, [7])
    assert pool.drop_unpinned() == 1 and pool.device.free == 1
    region_a = pool.region(a.scope).tensor()
    assert pool.device.resident(a.scope) == 1 and int(region_a[:BB].min()) == 7  # kept
    (slot,) = pool.lease(b, 1)
    assert slot.page == 0 and pool.device.resident(a.scope) == 0
    assert int(region_a[: pool.page_size].max()) == 0  # a's copy given back before b's use


@pytest.mark.parametrize("algo", ["xxh3", "crc32c"])
def test_a_block_is_checksummed_when_committed_with_the_pools_algorithm(algo: str) -> None:
    import crc32c
    import xxhash

    pool = Pool(
        node="n", backend="cpu", page_size=4 * BB, device_pages=1, host_pages=0,
        policy="lru", checksum=algo,
    )  # fmt: skip
    s = session(pool, "chat")
    (h,) = fill(pool, s, [5])
    block = pool.index.get((s.scope, h))
    assert block is not None and block.checksum is not None  # at commit, not at first send
    data = bytes([5]) * BB
    want = crc32c.crc32c(data) if algo == "crc32c" else xxhash.xxh3_64_intdigest(data)
    assert block.checksum == want
    with pytest.raises(ValueError, match="checksum 'sha1': use one of xxh3, crc32c"):
        Pool(node="n", backend="cpu", page_size=4 * BB, device_pages=1, host_pages=0,
             policy="lru", checksum="sha1")  # fmt: skip
