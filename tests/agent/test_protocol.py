"""The socket protocol's request checks and reply encoding, in process (no socket)."""

from __future__ import annotations

import array
import asyncio
from typing import Any

import pytest

from kvmarina.agent.api.protocol import AgentProtocol
from kvmarina.agent.node.index import Block, Slot
from kvmarina.agent.node.pool import Session
from kvmarina.events import LoadRecord

from .test_pool import BB, make_pool, session

DIGEST = 16


def setup() -> tuple[AgentProtocol, Session]:
    pool = make_pool(device_pages=4)
    return AgentProtocol(pool, None, DIGEST), session(pool, "chat")  # type: ignore[arg-type]  # no registers


def call(proto: AgentProtocol, sess: Session, msg: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(proto._dispatch(sess, msg))


def commit(proto: AgentProtocol, sess: Session, hashes: list[bytes]) -> None:
    slots = call(proto, sess, {"op": "lease", "n": len(hashes)})["slots"]
    items = [[p, i, h] for (p, i), h in zip(slots, hashes, strict=True)]
    assert call(proto, sess, {"op": "commit", "items": items})["ok"]
    assert call(proto, sess, {"op": "release", "hashes": hashes}) == {"ok": True}  # unpinned


GOOD = b"\x01" * DIGEST


@pytest.mark.parametrize(
    "hashes",
    [
        [b"short"],
        [GOOD, b"\x02" * (DIGEST + 1)],
        [b"\x02" * (DIGEST - 1), b"\x02" * (DIGEST + 1)],  # the right total, wrong each
        [GOOD, "x" * DIGEST],  # a string of the right length
        [GOOD, None],
        [GOOD, 7],
        [GOOD, True],
        [GOOD, 1.5],
        [GOOD, [1] * DIGEST],  # a list of the right length
        [GOOD, {str(i): i for i in range(DIGEST)}],
    ],
)
@pytest.mark.parametrize("op", ["lookup", "release", "unclaim", "probe", "drop"])
def test_a_bad_hash_anywhere_refuses_the_whole_request(op: str, hashes: list[Any]) -> None:
    proto, sess = setup()
    commit(proto, sess, [GOOD])
    msg: dict[str, Any] = {"op": op, "hashes": hashes}
    if op == "unclaim":
        msg = {"op": "release", "hashes": [], "unclaim": hashes}
    reply = call(proto, sess, msg)
    assert reply == {
        "ok": False,
        "error": f"every hash must be {DIGEST} bytes (the pool's hashing contract)",
    }
    assert sess.pins == {} and proto.pool.stats["lookups"] == 0  # nothing happened
    proto.pool.check_invariants()


@pytest.mark.parametrize("hashes", [None, b"\x01" * DIGEST, (GOOD,), {"a": GOOD}, 3])
def test_hashes_that_are_no_list_are_refused(hashes: Any) -> None:
    proto, sess = setup()
    reply = call(proto, sess, {"op": "lookup", "hashes": hashes})
    assert reply == {"ok": False, "error": "hashes must be a list"}


def test_a_lookup_reply_packs_each_hit_where_the_pool_has_it() -> None:
    proto, sess = setup()
    hashes = [bytes([i + 1]) * DIGEST for i in range(10)]
    commit(proto, sess, hashes[:7])
    call(proto, sess, {"op": "drop", "hashes": hashes[3:4]})  # the run stops before it
    reply = call(proto, sess, {"op": "lookup", "hashes": hashes})
    assert reply["ok"] and reply["n"] == 3 and reply["tiers"] == b"ddd"
    pages, indices = array.array("I", reply["pages"]), array.array("I", reply["indices"])
    blocks = [proto.pool.index.blocks[(sess.scope, h)] for h in hashes[:3]]
    assert list(pages) == [b.slot.page for b in blocks]
    assert list(indices) == [b.slot.index for b in blocks]
    assert sess.pins == {(sess.scope, h): 1 for h in hashes[:3]}
    assert call(proto, sess, {"op": "release", "hashes": hashes[:3]}) == {"ok": True}
    empty = call(proto, sess, {"op": "lookup", "hashes": []})
    assert (empty["n"], empty["pages"], empty["indices"], empty["tiers"]) == (0, b"", b"", b"")


def test_a_lookup_reply_names_each_hits_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups promote host hits, so a reply holds device tiers; should the pool hand
    back a host-tier block, its tier code says so."""
    proto, sess = setup()
    hashes = [bytes([i + 1]) * DIGEST for i in range(3)]
    tiers = ["device", "host", "device"]
    blocks = [
        Block((sess.scope, h), Slot(i, 2 * i), BB, "a/chat", tier=t)
        for i, (h, t) in enumerate(zip(hashes, tiers, strict=True))
    ]
    monkeypatch.setattr(proto.pool, "lookup_blocks", lambda _sess, _hashes: blocks)
    reply = call(proto, sess, {"op": "lookup", "hashes": hashes})
    assert reply["tiers"] == b"dhd"
    assert list(array.array("I", reply["pages"])) == [0, 1, 2]
    assert list(array.array("I", reply["indices"])) == [0, 2, 4]


@pytest.mark.parametrize(
    "figures",
    [{"running": -1, "waiting": 0}, {"running": True, "waiting": 0}, {"running": 1},
     {"running": 1, "waiting": "2"}, {"running": 1, "waiting": 2, "queued": 1.5}],
)  # fmt: skip
def test_a_bad_load_report_is_refused_and_publishes_nothing(figures: dict[str, Any]) -> None:
    proto, sess = setup()
    sess.pod = "engine-0"
    sub = proto.pool.events.subscribe()
    sub.queue.get_nowait()  # the snapshot
    reply = call(proto, sess, {"op": "load", **figures})
    assert reply == {
        "ok": False,
        "error": "load needs running and waiting (and queued) as integers >= 0",
    }
    assert sub.queue.empty()


def test_a_load_report_reaches_every_subscriber_under_the_pod_name() -> None:
    proto, sess = setup()
    subs = [proto.pool.events.subscribe() for _ in range(2)]
    for sub in subs:
        sub.queue.get_nowait()  # the snapshot
    # an engine that did not say its pod cannot be told apart from its node's others
    assert call(proto, sess, {"op": "load", "running": 1, "waiting": 0}) == {
        "ok": False,
        "error": "load needs a session registered with its pod name ('pod')",
    }
    sess.pod = "engine-0"
    assert call(proto, sess, {"op": "load", "running": 3, "waiting": 2, "queued": 900}) == {
        "ok": True
    }
    seq = proto.pool.events.seq
    for sub in subs:
        assert sub.queue.get_nowait() == LoadRecord("engine-0", 3, 2, 900)
    assert proto.pool.events.seq == seq  # not numbered: no gap for a router to see
