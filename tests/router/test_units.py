"""Pure logic of the router: headers, config, tenancy, index, hash memo, policies."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from pathlib import Path

import pytest

from kvmarina.events import BlockEvent, LoadRecord, Snapshot
from kvmarina.hashing import HashContract
from kvmarina.headers import PullHint, PullHintError, parse_pull_hint
from kvmarina.load_report import EngineLoad
from kvmarina.router import routing
from kvmarina.router.admission import Admission, Rejected
from kvmarina.router.config import DEFAULT_BLOCK_BYTES, ConfigError, load_config, parse_config
from kvmarina.router.hashmemo import HashMemo
from kvmarina.router.index import BlockIndex
from kvmarina.router.pods import Breaker, PodState
from kvmarina.router.routing import NoPodAvailable, RoutingCore
from kvmarina.router.subscriber import NodeFollower
from kvmarina.router.tenancy import derive_salt

from .conftest import router_doc


def queue(pod: PodState, tokens: int) -> None:
    """``tokens`` of prefill just sent to ``pod`` (nothing of it done yet)."""
    pod.queued_tokens = 0
    pod.queue_add(tokens, time.monotonic())


def H(i: int) -> bytes:
    return i.to_bytes(16, "big")


def pods(n: int, agents: bool = True) -> list[dict[str, str]]:
    return [
        {
            "name": f"p{i}",
            "url": f"http://127.0.0.1:{20000 + i}",
            "node": f"n{i}",
            **({"agent_url": f"http://127.0.0.1:{21000 + i}"} if agents else {}),
        }
        for i in range(n)
    ]


# -- pull hint -----------------------------------------------------------------------
def test_pull_hint_round_trip_and_errors() -> None:
    hint = PullHint("node-b", "http://10.0.0.2:7070", 12)
    text = hint.format()
    assert text == "node=node-b;agent=http://10.0.0.2:7070;blocks=12"
    assert parse_pull_hint(text) == hint
    assert parse_pull_hint("blocks=3;agent=http://a:1;node=x;future=1") == PullHint(
        "x", "http://a:1", 3
    )
    for bad in (
        "node=x;agent=http://a",
        "node=x;agent=http://a;blocks=two",
        "garbage",
        "node=;agent=http://a;blocks=1",
        "node=x;agent=http://a;blocks=0",
    ):
        with pytest.raises(PullHintError):
            parse_pull_hint(bad)


# -- config ---------------------------------------------------------------------------
def test_config_yaml_and_json(tmp_path: Path) -> None:
    doc = router_doc(pods(2), sharing={"scope": "cluster", "tenant_header": "x-tenant"})
    y = tmp_path / "r.yaml"
    import yaml

    y.write_text(yaml.safe_dump(doc))
    j = tmp_path / "r.json"
    j.write_text(json.dumps(doc))
    a, b = load_config(y), load_config(j)
    assert a == b
    assert a.sharing.tenant_header == "x-tenant"
    assert a.contract == HashContract()
    assert a.pods[1].agent_url == "http://127.0.0.1:21001"


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"polcy": 1}, "unknown key(s) polcy"),
        ({"sharing": {"scope": "world"}}, "sharing.scope"),
        ({"routing": {"policy": "random"}}, "routing.policy"),
        ({"routing": {"prefill_tokens_per_second": "fast"}}, "routing.prefill_tokens_per_second"),
        ({"hashing": {"algorithm": "sha256", "digest_bits": 128}}, "hashing"),
        ({"pods": []}, "pods must be a non-empty list"),
        ({"pods": [{"name": "a", "url": "ftp://x", "node": "n"}]}, "pods[0].url"),
        ({"pods": [{"name": "a", "url": "http://x", "node": "n"}] * 2}, "not unique"),
        ({"model_identity": ""}, "model_identity"),
    ],
)
def test_config_errors_name_the_field(patch: dict[str, object], needle: str) -> None:
    doc = router_doc(pods(1), **patch)
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    assert needle in str(exc.value)


def test_a_blocks_size_for_pull_estimates_comes_from_the_model_identity() -> None:
    """What a pull moves per block is the engines' KV block, which the identity's layout
    names (2 x layers x KV heads x head dim x item size x block tokens); a value given
    in the config wins, and an identity without a layout falls back to the default."""
    ident = "small@main|L2/H2/D32/float32/B32|tp0of1"
    assert parse_config(router_doc(pods(1), model_identity=ident)).routing.block_bytes == (
        2 * 2 * 2 * 32 * 4 * 32
    )
    given = router_doc(pods(1), model_identity=ident, routing={"block_bytes": 4096})
    assert parse_config(given).routing.block_bytes == 4096
    assert parse_config(router_doc(pods(1))).routing.block_bytes == DEFAULT_BLOCK_BYTES
    with pytest.raises(ConfigError, match=r"routing\.block_bytes"):
        parse_config(router_doc(pods(1), routing={"block_bytes": -1}))


def test_config_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


# -- tenancy -----------------------------------------------------------------------------
def test_salt_by_scope_tenant_and_client_salt() -> None:
    from kvmarina.router.config import SharingConfig

    ns = SharingConfig(scope="namespace")
    assert derive_salt(ns, "a", "s", {}) == derive_salt(ns, "a", "other", {})
    assert derive_salt(ns, "a", "s", {}) != derive_salt(ns, "b", "s", {})
    none = SharingConfig(scope="none")
    assert derive_salt(none, "a", "s1", {}) != derive_salt(none, "a", "s2", {})
    cl = SharingConfig(scope="cluster", tenant_header="x-tenant")
    assert derive_salt(cl, "a", "s", {"x-tenant": "t1"}) != derive_salt(
        cl, "a", "s", {"x-tenant": "t2"}
    )
    assert derive_salt(cl, "a", "s", {"x-tenant": "t1"}) == derive_salt(
        cl, "b", "z", {"x-tenant": "t1"}
    )
    # a client salt is ignored unless allowed
    assert derive_salt(cl, "a", "s", {"x-kvmarina-salt": "evil"}) == derive_salt(cl, "a", "s", {})
    allow = SharingConfig(scope="cluster", allow_client_salt=True)
    assert derive_salt(allow, "a", "s", {"x-kvmarina-salt": "k"}) != derive_salt(
        allow, "a", "s", {}
    )


# -- index ----------------------------------------------------------------------------------
def test_index_runs_tiers_and_eviction() -> None:
    idx = BlockIndex(100)
    chain = [H(i) for i in range(10)]
    idx.store("a", chain[:6], "device")
    idx.store("b", chain[:3], "device")
    idx.store("b", chain[3:8], "host")
    idx.store("c", chain[1:9], "device")  # lacks block 0: no run
    m = idx.match(chain)
    assert m.run == {"a": 6, "b": 8}
    assert m.host == {"b": 5}
    assert idx.tiers(chain[4]) == {"a": "device", "b": "host", "c": "device"}
    idx.store("b", [chain[4]], "device")  # moved back to device
    assert idx.match(chain).host == {"b": 4}
    idx.evict("a", [chain[2]])
    assert idx.match(chain).run["a"] == 2
    assert idx.match([H(99)]).run == {}


def test_index_drop_node_sweep_and_slot_reuse() -> None:
    idx = BlockIndex(1000)
    idx.store("a", [H(i) for i in range(50)], "device")
    idx.store("b", [H(i) for i in range(20)], "host")
    idx.drop_node("a")
    assert idx.match([H(0)]).run == {"b": 1}
    assert idx.node_blocks("a") == {}
    while not idx.sweep(budget=7):
        pass
    assert len(idx) == 20  # a's blocks are gone, b's stay
    idx.store("c", [H(0)], "device")  # reuses a's slot: no stale bits may show up
    assert idx.match([H(i) for i in range(5)]).run == {"b": 5, "c": 1}
    idx.replace_node("b", {H(0): "device", H(1): "host"})
    idx.sweep()
    assert idx.node_blocks("b") == {H(0): "device", H(1): "host"}


def test_index_lru_cap() -> None:
    idx = BlockIndex(10)
    idx.store("a", [H(i) for i in range(8)], "device")
    idx.match([H(0), H(1)], touch=True)  # 0 and 1 become most recent
    idx.store("a", [H(i) for i in range(8, 12)], "device")
    assert len(idx) == 10 and idx.evictions == 2
    assert idx.tiers(H(0)) and idx.tiers(H(1)) and not idx.tiers(H(2))


@pytest.mark.parametrize("cap", [10**6, 25])
def test_index_matches_naive_model(cap: int) -> None:
    """Lookups, tiers and per-node counts against plain dicts (with a small cap, the
    LRU trims: the counts must follow what is left)."""
    rng = random.Random(3)
    idx = BlockIndex(cap)
    truth: dict[str, dict[bytes, str]] = {n: {} for n in "abcd"}
    for _ in range(400):
        for node in "abcd":
            assert idx.blocks_of(node) == len(idx.node_blocks(node))
        node, op = rng.choice("abcd"), rng.random()
        hs = [H(rng.randrange(40)) for _ in range(rng.randrange(1, 6))]
        if op < 0.6:
            tier = rng.choice(["device", "host"])
            idx.store(node, hs, tier)
            truth[node].update(dict.fromkeys(hs, tier))
        elif op < 0.95:
            idx.evict(node, hs)
            for h in hs:
                truth[node].pop(h, None)
        else:
            idx.drop_node(node)
            truth[node] = {}
            idx.sweep(budget=3)
    if cap < 40:
        return
    chain = [H(i) for i in range(40)]
    m = idx.match(chain, touch=False)
    for node, blocks in truth.items():
        run = 0
        while run < 40 and chain[run] in blocks:
            run += 1
        assert m.run.get(node, 0) == run
        assert m.host.get(node, 0) == sum(blocks[h] == "host" for h in chain[:run])
        assert idx.node_blocks(node) == blocks


# -- hash memo --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 15, 16, 511, 512, 513, 3000])
def test_hash_memo_is_bit_identical(n: int) -> None:
    rng = random.Random(n)
    c = HashContract()
    memo = HashMemo(c, "ident", max_chunks=8, chunk_blocks=4)
    toks = [rng.randrange(2**32) for _ in range(n)]
    for salt in ("", "t1", "t1"):
        assert memo.block_hashes(toks, salt) == c.block_hashes(toks, "ident", salt)
    assert memo.hits > 0 or not 64 <= n <= 512  # larger prompts overflow the 8-chunk memo


# -- policies ----------------------------------------------------------------------------------
def core(policy: str = "cache-aware", n: int = 3, **routing: object) -> RoutingCore:
    rc = RoutingCore(parse_config(router_doc(pods(n), routing={"policy": policy, **routing})))
    rc.live_nodes |= {f"n{i}" for i in range(n)}
    return rc


def test_cache_aware_prefers_the_cached_node_until_its_queue_costs_more() -> None:
    rc = core()
    toks = list(range(1600))  # 100 blocks
    hs = rc.hashes(toks, "s")
    rc.index.store("n2", hs, "device")
    d = rc.decide(toks, "s")
    assert d.ranked[0].name == "p2" and d.cached_blocks == {"n2": 100}
    assert d.pull is None or d.pull.node == "n2"
    queue(rc.pods["p2"], 10**6)  # a long queue outweighs the cache
    assert rc.decide(toks, "s").ranked[0].name != "p2"


def test_pull_hint_when_migration_is_cheaper() -> None:
    rc = core(transfer_bytes_per_second=1e12)
    toks = list(range(1600))
    hs = rc.hashes(toks, "s")
    rc.index.store("n0", hs, "device")
    queue(rc.pods["p0"], 10**6)
    d = rc.decide(toks, "s")
    assert d.ranked[0].name != "p0"
    assert d.pull == PullHint("n0", "http://127.0.0.1:21000", 100)
    off = core(transfer_bytes_per_second=1e12, pull_hints=False)
    off.index.store("n0", hs, "device")
    queue(off.pods["p0"], 10**6)
    assert off.decide(toks, "s").pull is None
    slow = core(transfer_bytes_per_second=1.0)
    slow.index.store("n0", hs, "device")
    queue(slow.pods["p0"], 10**6)
    assert slow.decide(toks, "s").pull is None


def test_measured_bandwidth_overrides_the_configured_one() -> None:
    toks = list(range(1600))
    rc = core(transfer_bytes_per_second=1e12)  # the config says pulls are nearly free
    hs = rc.hashes(toks, "s")
    rc.index.store("n0", hs, "device")
    queue(rc.pods["p0"], 10**6)
    assert rc.decide(toks, "s").pull is not None
    rc.bandwidth.update({"n1": 1.0, "n2": 1.0})  # but the agents measured 1 byte/s
    assert rc.decide(toks, "s").pull is None


def test_a_pulls_fixed_cost_is_learned_from_pulling_requests_and_forgotten_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pull pays a latency beyond its bytes (handshakes, a peer agent sharing its
    CPU with an engine): learned from pulling requests' TTFTs, it turns a pull that
    the bytes alone would justify into a recompute; with no pull since, it fades."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rc = core(transfer_bytes_per_second=1e12, block_bytes=32768)
    toks = list(range(320))  # 20 blocks: 40 ms of prefill at 8,000 tokens/s
    rc.index.store("n0", rc.hashes(toks, "s"), "device")
    queue(rc.pods["p0"], 10**6)
    assert rc.decide(toks, "s").pull is not None
    for _ in range(20):  # every pull took 120 ms beyond its queue and prefill
        rc.observe_pull(rc.pods["p1"], 20, 0.12)
    assert rc.pull_latency(clock[0]) == pytest.approx(0.12, rel=0.02)
    assert rc.decide(toks, "s").pull is None
    assert rc.pods["p1"].prefill_tps == 8000.0  # a pulling TTFT is not a prefill sample
    clock[0] += 4 * routing.PULL_LATENCY_HALF_LIFE_S
    assert rc.pull_latency(clock[0]) == pytest.approx(0.12 / 16, rel=0.02)
    queue(rc.pods["p0"], 10**6)  # the holder is still (again) busy
    assert rc.decide(toks, "s").pull is not None
    rc.observe_pull(rc.pods["p1"], 20, 60.0)  # a stalled peer: clamped, not believed
    assert rc.pull_latency(clock[0]) <= 0.2 * routing.PULL_LATENCY_MAX_S + 0.01


def test_a_new_conversation_goes_where_the_cache_is_smallest() -> None:
    """With no pod holding more of the prompt than another, the pod whose cache holds
    less wins (what a pod caches, later turns ask of it); a pod holding the prompt
    still wins however full its cache."""
    rc = core(n=2, weights={"balance": 0.1})
    old = list(range(5000, 5000 + 16 * 200))
    rc.index.store("n0", rc.hashes(old, "s"), "device")  # n0 serves 200 blocks' worth
    for k in range(4):
        assert rc.decide(list(range(k * 100, k * 100 + 320)), "s").best.name == "p1"
    assert rc.decide([*old, 7], "s").best.name == "p0"
    plain = core(n=2)  # the default: off
    plain.index.store("n0", plain.hashes(old, "s"), "device")
    firsts = {plain.decide(list(range(k * 100, k * 100 + 320)), "s").best.name for k in range(4)}
    assert firsts == {"p0", "p1"}  # without the term, idle pods take turns


def test_a_new_conversation_goes_to_the_cache_that_took_in_least_lately(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Among idle pods, a prompt none holds goes to the pod whose cache took in the fewest
    new tokens lately (each evicts an older block); that intake is forgotten by half every
    ``STORED_HALF_LIFE_S``; a slower pod is not taken for it, nor is a prompt that a pod
    holds moved."""
    from kvmarina.router.pods import STORED_HALF_LIFE_S

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rc = core(n=3)
    p0, p1, p2 = (rc.pods[f"p{i}"] for i in range(3))
    for pod, tokens in ((p0, 9000), (p1, 3000), (p2, 6000)):
        pod.queue_add(tokens, clock[0] - 60)
        pod.queue_done(tokens)  # long done: no queue left
    assert p0.queue_ahead(clock[0]) == p1.queue_ahead(clock[0]) == 0
    for k in range(3):
        assert rc.decide(list(range(k * 500, k * 500 + 320)), "s").best is p1
    intake = p1.stored_lately(clock[0])
    assert p1.stored_lately(clock[0] + STORED_HALF_LIFE_S) == pytest.approx(intake / 2)
    p1.queue_add(100, clock[0])  # a queue: more than a tenth of a 320-token prefill
    assert p1.stored_lately(clock[0]) < p2.stored_lately(clock[0])  # still the least intake
    assert rc.decide(list(range(7000, 7320)), "s").best is p2
    held = list(range(9000, 9000 + 320))
    rc.index.store("n0", rc.hashes(held, "s"), "device")
    assert rc.decide([*held, 1, 2, 3], "s").best is p0


def test_host_tier_hit_costs_a_load() -> None:
    rc = core(host_load_tokens_per_second=1000.0)
    toks = list(range(1600))
    hs = rc.hashes(toks, "s")
    rc.index.store("n0", hs, "host")
    rc.index.store("n1", hs, "device")
    assert rc.decide(toks, "s").ranked[0].name == "p1"


def test_other_policies() -> None:
    rr = core("round-robin")
    assert [rr.decide([1], "s").ranked[0].name for _ in range(4)] == ["p0", "p1", "p2", "p0"]
    ll = core("least-load")
    ll.pods["p0"].inflight = 3
    ll.pods["p1"].inflight = 1
    ll.pods["p2"].inflight = 2
    assert ll.decide([1], "s").ranked[0].name == "p1"
    ss = core("session")
    first = ss.decide([1], "s", {"x-session-id": "abc"}).ranked[0].name
    assert all(
        ss.decide([2], "s", {"x-session-id": "abc"}).ranked[0].name == first for _ in range(5)
    )
    for p in ss.pods.values():
        p.healthy = False
    with pytest.raises(NoPodAvailable):
        ss.decide([1], "s")


def test_approximate_mode_uses_where_it_sent() -> None:
    rc = RoutingCore(parse_config(router_doc(pods(3, agents=False))))
    assert rc.mode == "approximate"
    toks = list(range(320))
    d = rc.decide(toks, "s")
    rc.record_sent(d.ranked[0].node, d.hashes)
    again = rc.decide(toks, "s")
    assert again.ranked[0].name == d.ranked[0].name
    assert again.cached_blocks == {d.ranked[0].node: 20} and again.pull is None


def test_breaker_opens_and_half_opens() -> None:
    b = Breaker(threshold=2, cooldown_s=10)
    b.on_failure(now=0)
    assert b.allows(now=0)
    b.on_failure(now=0)
    assert b.state == "open" and not b.allows(now=5)
    assert b.allows(now=11) and b.state == "half-open"
    b.on_attempt()
    assert not b.allows(now=11)  # one trial at a time
    b.on_failure(now=11)
    assert b.state == "open"
    assert b.allows(now=22)
    b.on_success()
    assert b.state == "closed"


async def test_admission_queue_bounds() -> None:
    adm = Admission(max_inflight=1, max_queue=1, timeout_s=0.2)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    with pytest.raises(Rejected, match="queue full"):
        await adm.acquire()
    adm.release()
    await waiter
    assert adm.inflight == 1
    with pytest.raises(Rejected, match="timed out"):
        await adm.acquire()
    adm.release()
    assert adm.inflight == 0 and adm.queued == 0


def test_duplication_weight_keeps_prefixes_in_one_place() -> None:
    toks = list(range(1600))  # 100 blocks on n2, whose queue is 3000 tokens long
    picks = {}
    for dup in (0.0, 2.0):
        rc = core(weights={"duplication": dup}, pull_hints=False)
        rc.index.store("n2", rc.hashes(toks, "s"), "device")
        queue(rc.pods["p2"], 3000)
        picks[dup] = rc.decide(toks, "s").ranked[0].name
    assert picks[0.0] != "p2" and picks[2.0] == "p2"


def two_pods_on_one_node() -> RoutingCore:
    """Pods ``a`` and ``b`` on node ``n0``, whose agent's events are live."""
    pods_ = [
        {"name": n, "url": f"http://127.0.0.1:{20000 + i}", "node": "n0",
         "agent_url": "http://127.0.0.1:21000"}
        for i, n in enumerate(("a", "b"))
    ]  # fmt: skip
    rc = RoutingCore(parse_config(router_doc(pods_, routing={"policy": "cache-aware"})))
    rc.live_nodes = {"n0"}
    return rc


def test_a_prefix_in_flight_is_waited_for_not_computed_twice() -> None:
    """Until its blocks are committed, a new prefix is only in the engine computing it.
    A second request for it stays with that pod unless its queue is longer than the
    prefix; then it goes to the idle sibling (whose engine waits for the blocks in
    flight, as the agent's claims say, rather than compute them a second time)."""
    rc = two_pods_on_one_node()
    toks = list(range(1600))  # 100 blocks, nothing committed yet
    first = rc.decide(toks, "s").ranked[0]
    rc.record_sent(first.node, rc.hashes(toks, "s"), 0, first.name)
    queue(first, 1600)
    d = rc.decide([*toks, 7], "s")
    assert d.ranked[0].name == first.name
    queue(first, 8000)
    d = rc.decide([*toks, 7], "s")
    assert d.ranked[0].name != first.name and d.cached_blocks == {"n0": 100}
    # once the agent confirms the blocks, either pod of the node has them
    rc.index.store("n0", rc.hashes(toks, "s"), "device")
    queue(first, 1600)
    d = rc.decide([*toks, 7], "s")
    assert d.ranked[0].name != first.name


def test_a_conversation_stays_on_the_engine_that_computed_it_while_that_engine_is_free() -> None:
    """Both engines of a node read its blocks, the one that computed them a little
    faster: an idle one keeps its conversations (long after the in-flight memory
    has expired), a busy one's next turn goes to its idle sibling."""
    rc = two_pods_on_one_node()
    toks = list(range(1600))
    for turn in range(4):
        toks = [*toks, *range(100 * turn, 100 * turn + 64)]
        d = rc.decide(toks, "s")
        if turn == 0:
            owner = d.ranked[0]
        assert d.ranked[0] is owner, f"turn {turn} moved to {d.ranked[0].name}"
        rc.record_sent(owner.node, d.hashes, 0, owner.name)
        rc.index.store("n0", d.hashes, "device")  # the agent's events confirm it
        rc._expire_recent(time.monotonic() + 60)  # the next turn comes much later
    queue(owner, 400)
    toks = [*toks, *range(64)]
    assert rc.decide(toks, "s").ranked[0] is not owner


def test_a_cleared_node_forgets_which_of_its_pods_computed_what() -> None:
    """After the agent's ``cleared`` event nothing on the node holds the prefix, so
    the pod it was sent to has no claim on it (the sibling term must not keep
    favouring it); the follower applies the event to the index and the pods."""
    rc = two_pods_on_one_node()
    toks = list(range(1600))
    hs = rc.hashes(toks, "s")
    rc.record_sent("n0", hs, 0, "a")
    follower = NodeFollower(
        "n0", "http://127.0.0.1:21000", rc.index, lambda n, live: None, None,  # type: ignore[arg-type]
        on_cleared=rc.forget_node,
    )  # fmt: skip
    follower.apply(Snapshot("boot-1", 1, "n0", dict.fromkeys(hs, "device")))
    assert rc.sent.match(hs).run == {"a": 100} and rc.index.match(hs).run == {"n0": 100}
    follower.apply(BlockEvent("cleared", "boot-1", 2))
    assert rc.sent.match(hs).run == {} and rc.index.match(hs).run == {}
    assert rc.recent.match(hs).run == {}


def test_a_pushed_load_report_goes_to_the_pod_it_names() -> None:
    """Engines push their load on their node's stream (not numbered: the follower's
    ``seq`` stays); a report names its pod, or, unnamed, is its node's only pod's."""
    rc = two_pods_on_one_node()
    follower = NodeFollower(
        "n0", "http://127.0.0.1:21000", rc.index, lambda n, live: None, None,  # type: ignore[arg-type]
        on_load=rc.note_pushed_load,
    )  # fmt: skip
    follower.apply(Snapshot("boot-1", 1, "n0", {}))
    follower.apply(LoadRecord("b", running=5, waiting=2))
    a, b = rc.pods["a"], rc.pods["b"]
    now = b.engine_at  # (what the engine reported drains from then on)
    assert b.engine_fresh(now) == EngineLoad(5, 2) and b.pushed == 1 and follower.seq == 1
    assert a.engine_fresh(now) is None
    b.tokens_per_request = 300.0  # the engine's 2 waiting requests are someone else's
    assert rc.queued(b, now) == 600.0
    follower.apply(LoadRecord("", running=1, waiting=0))  # which of the two? neither
    follower.apply(LoadRecord("gone", running=1, waiting=0))  # not one of ours
    assert a.pushed == 0 and b.pushed == 1
    solo = core(n=1)
    solo.note_pushed_load("n0", LoadRecord("", running=3, waiting=1, queued_tokens=64))
    (p0,) = solo.pods.values()
    assert p0.engine_fresh(time.monotonic()) == EngineLoad(3, 1, 64)


def test_a_pull_hint_names_only_blocks_the_peer_agent_announced() -> None:
    """A prefix sent to n0 a moment ago (its prefill still running there) draws the
    next request to n0, but cannot be pulled from it yet: a request that must go
    elsewhere gets no hint for those blocks; once n0's agent announces them, it does."""
    rc = core(transfer_bytes_per_second=1e12)
    toks = list(range(1600))
    hs = rc.hashes(toks, "s")
    rc.record_sent("n0", hs, 0, "p0")  # in flight on p0, not committed
    queue(rc.pods["p0"], 10**6)
    d = rc.decide(toks, "s")
    assert d.ranked[0].name != "p0" and d.pull is None
    rc.index.store("n0", hs[:40], "device")  # the first 40 blocks are committed now
    d = rc.decide(toks, "s")
    assert d.ranked[0].name != "p0" and d.pull == PullHint("n0", "http://127.0.0.1:21000", 40)


def test_a_servings_pods_share_one_learned_prefill_rate() -> None:
    """A TTFT observed on one pod refines the rate of all (replicas run the same model
    on the same resources); a pod that joins starts from the learned rate."""
    rc = RoutingCore(parse_config(router_doc(pods(2), routing={"prefill_tokens_per_second": 1000})))
    a, b = rc.pods["p0"], rc.pods["p1"]
    rc.observe_ttft(a, 2000, 1.0, 0.0)  # 2,000 tokens/s observed on p0
    assert a.prefill_tps == b.prefill_tps == pytest.approx(0.8 * 1000 + 0.2 * 2000)
    rc.apply_config(parse_config(router_doc(pods(3), routing={"prefill_tokens_per_second": 1000})))
    assert rc.pods["p2"].prefill_tps == a.prefill_tps


def test_vllm_pods_are_cache_domains_of_their_own() -> None:
    doc = router_doc(
        [{**p, "kv_events": f"tcp://127.0.0.1:{5000 + i}"} for i, p in enumerate(pods(2))],
        engine="vllm",
    )
    rc = RoutingCore(parse_config(doc))
    assert {p.domain for p in rc.pods.values()} == {"pod/p0", "pod/p1"}
    tokens = list(range(64))
    hashes = rc.hashes(tokens, "s")
    rc.index.store("pod/p1", hashes[:2], "device")
    rc.live_nodes |= {"pod/p0", "pod/p1"}
    d = rc.decide(tokens, "s")
    assert d.ranked[0].name == "p1" and d.cached_blocks == {"pod/p1": 2} and d.pull is None


def test_the_queue_ahead_of_a_pod_shrinks_as_its_engine_works() -> None:
    pod = PodState(parse_config(router_doc(pods(1))).pods[0], prefill_tps=1000.0)
    assert pod.queue_ahead(10.0) == 0.0
    pod.queue_add(2000, now=10.0)  # a long prompt: 2 s of prefill at 1,000 tokens/s
    assert pod.queue_ahead(10.0) == 2000 and pod.queue_ahead(11.5) == 500
    pod.queue_add(300, now=11.5)
    assert pod.queue_ahead(11.5) == 800
    pod.queue_done(2000)  # the long one answered: the short one is all that is left
    assert pod.queue_ahead(12.1) == pytest.approx(200)
    pod.queue_done(300)
    assert pod.queued_tokens == 0 and pod.queue_ahead(20.0) == 0.0


def test_a_vllm_request_carries_the_routers_salt_and_pull_hint_only() -> None:
    from kvmarina.router.vllm_request import vllm_request, with_pull

    client = {"prompt": "x", "cache_salt": "mine", "kv_transfer_params": {
        "kvmarina_pull": {"agent": "http://evil"}, "do_remote_decode": False}}  # fmt: skip
    body = vllm_request(client, "n7:default")
    assert body["cache_salt"] == "n7:default"
    assert body["kv_transfer_params"] == {"do_remote_decode": False}
    assert "kv_transfer_params" not in vllm_request(
        {"kv_transfer_params": {"kvmarina_pull": 1}}, "s"
    )
    hinted = with_pull(body, PullHint("node-b", "http://10.0.0.2:7470", 12))
    assert hinted["kv_transfer_params"] == {
        "do_remote_decode": False,
        "kvmarina_pull": {"node": "node-b", "agent": "http://10.0.0.2:7470", "blocks": 12},
    }


def test_a_vllm_pod_with_the_connector_reads_its_nodes_pool_at_a_load_cost() -> None:
    doc = router_doc(
        [{**p, "kv_events": f"tcp://127.0.0.1:{5000 + i}"} for i, p in enumerate(pods(2))],
        engine="vllm",
    )
    rc = RoutingCore(parse_config(doc))
    p0, p1 = rc.pods["p0"], rc.pods["p1"]
    assert (p0.domain, p0.shared) == ("pod/p0", "n0")
    tokens = list(range(16 * 40))
    hashes = rc.hashes(tokens, "s")
    rc.live_nodes |= {"pod/p0", "pod/p1", "n0", "n1"}
    rc.index.store("n1", hashes[:30], "device")  # node 1's pool has 30 blocks
    rc.index.store("pod/p0", hashes[:10], "device")  # p0's own cache 10
    d = rc.decide(tokens, "s")
    assert d.ranked[0].name == "p1"  # 30 blocks from its node's pool beat 10 of its own
    assert d.uncached_tokens(p1, len(tokens), 16) == len(tokens) - 30 * 16
    assert d.pull is None  # n1 is p1's own node: nothing to pull
    # node 0's pool gets everything: p0 reads it; a pull from n1 is not needed
    rc.index.store("n0", hashes, "device")
    assert rc.decide(tokens, "s").ranked[0].name == "p0"


# -- the fast decision path against its plain definition ------------------------------------
def test_a_prompts_chain_is_hashed_as_far_as_asked_and_memoized() -> None:
    rng = random.Random(7)
    c = HashContract()
    memo = HashMemo(c, "ident", max_chunks=64, chunk_blocks=4)
    toks = [rng.randrange(2**32) for _ in range(16 * 37 + 5)]
    full = c.block_hashes(toks, "ident", "s")
    chain = memo.chain(toks, "s")
    assert chain.upto(3) == full[:3] and chain.hashed == 3  # a probe: 3 blocks, no more
    step = 0
    while len(chain.done) < chain.n_blocks:
        step += rng.randrange(1, 7)
        assert chain.upto(step) == full[: len(chain.done)] and len(chain.done) >= min(step, 37)
    assert chain.all() == full and len(chain) == 37
    # every chunk was memoized under its exact key, probes included: no hashing again
    again = memo.chain(toks, "s")
    assert again.all() == full and again.hashed == 0
    assert memo.chain(toks, "other salt").all() == c.block_hashes(toks, "ident", "other salt")


def test_lookups_find_every_nodes_run_among_many_nodes() -> None:
    """Runs of 300 nodes (masks wider than a machine word), many lengths, ties, a
    dropped node and host tiers, against a plain count per node."""
    rng = random.Random(11)
    idx = BlockIndex(10**6)
    chain = [H(i) for i in range(64)]
    held: dict[str, int] = {}
    for k in range(300):
        node, run = f"n{k}", rng.choice([0, 1, 5, 5, 17, 40, 64])
        idx.store(node, chain[:run], rng.choice(["device", "host"]))
        idx.store(node, chain[run + 1 : run + 3], "device")  # past a gap: not in the run
        held[node] = run
    idx.drop_node("n7")
    held["n7"] = 0
    for cut in (64, 30, 5, 1):
        m = idx.match(chain[:cut])
        want = {n: min(r, cut) for n, r in held.items() if r}
        assert m.run == dict(sorted(want.items(), key=lambda kv: idx._slot_of[kv[0]]))
        for node, run in m.run.items():
            assert m.host.get(node, 0) == sum(idx.tiers(h).get(node) == "host" for h in chain[:run])


def reference_decision(
    rc: RoutingCore, toks: list[int], now: float, draws: random.Random
) -> list[tuple[float, str, str]]:
    """The cache-aware cost of every pod as docs/design.md "Routing" and the routing module
    docstring define it, term by term, with the pods' own methods and every block hashed
    first (the plain form of ``RoutingCore._cache_aware``): (cost, pod, pull peer).
    ``draws``: the router's random numbers for ``REPLICA_SPREAD``, in pod order."""
    from kvmarina.router.routing import COLD_SPREAD, REPLICA_SPREAD

    r, w, bs = rc.cfg.routing, rc.cfg.routing.weights, rc.contract.block_size
    host_s_per_block = bs / r.host_load_tokens_per_second  # as the code rounds it
    hashes = rc.hashes(toks, "s")
    match, recent = rc.lookup(hashes)
    runs = rc._runs(match.run, recent) if recent else match.run
    best = sorted(runs.items(), key=lambda kv: kv[1], reverse=True)[:3]
    sent = rc.sent.match(hashes).run if w.sibling else {}
    out = []
    pod_runs = []
    for pod in rc.pods.values():
        tps, node, shared = pod.prefill_tps, pod.domain, pod.shared
        run, cost, peer = runs.get(node, 0), 0.0, ""
        if shared is not None and runs.get(shared, 0) > run:
            cost += (runs[shared] - run) * host_s_per_block
            run = runs[shared]
        own = max(match.run.get(node, 0), recent.get(pod.name, 0))
        if recent and run > own:
            cost += w.inflight * (run - own) * bs / tps
        queued = rc.queued(pod, now)
        cost += (w.queue * queued + w.prefill * (len(toks) - run * bs)) * pod.slowdown(now) / tps
        if sent:
            cost += w.sibling * max(0, run - sent.get(pod.name, 0)) * bs / tps
        if runs:
            cost += match.host.get(shared or node, 0) * host_s_per_block
            peer_run = next((v for k, v in best if k not in (node, shared)), 0)
            if peer_run > run:
                cost += w.duplication * (peer_run - run) * bs / tps
                # the pull comes from the best node pool that is not this pod's
                pools = [(k, v) for k, v in match.run.items() if rc.agent_of(k)]
                pools = [kv for kv in pools if kv[0] not in (node, shared)]
                cand, src_run = max(pools, key=lambda kv: kv[1], default=("", 0))
                pullable = src_run - run
                if r.pull_hints and rc.mode != "approximate" and pullable > 0:
                    bw = rc.bandwidth.get(shared or node)
                    per_block = r.block_bytes / (bw or r.transfer_bytes_per_second)
                    saved = w.prefill * pullable * bs / tps - w.migration * pullable * per_block
                    saved -= w.migration * rc.pull_latency(now)
                    if saved > 0:
                        cost, peer = cost - saved, cand
        if r.replicas > 1 and node not in runs and (shared is None or shared not in runs):
            cost *= 1.0 + REPLICA_SPREAD * draws.random()  # a replica's cold placement
        out.append((cost, pod.name, peer))
        pod_runs.append(run)
    stored = [p.stored_lately(now) for p in rc.pods.values()]
    if not runs and len(out) > 1 and max(stored) > min(stored):  # a new conversation
        k = COLD_SPREAD * min(out)[0] / (max(stored) - min(stored))
        out = [
            (c + k * (s - min(stored)), name, peer)
            for (c, name, peer), s in zip(out, stored, strict=True)
        ]
    if w.balance and min(pod_runs) == max(pod_runs):  # no pod has an edge: the balance term
        sizes = [
            len((rc.index if p.domain in rc.live_nodes else rc.approx).node_blocks(p.domain))
            for p in rc.pods.values()
        ]
        out = [
            (cost + w.balance * bs * (size - min(sizes)) / rc.pods[name].prefill_tps, name, peer)
            if size > min(sizes)
            else (cost, name, peer)
            for (cost, name, peer), size in zip(out, sizes, strict=True)
        ]
    return out


@pytest.mark.parametrize("seed", range(12))
def test_the_decision_equals_its_plain_definition(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing only what the indexes hold, the bisected lookups and the inlined per-pod
    load change no cost: for random fleets, loads and cache states, every pod's cost is
    the plain formula's (so the order, the estimate and the pull hint are too)."""
    from kvmarina.load_report import EngineLoad

    rng = random.Random(seed)
    vllm = seed % 3 == 0
    n = rng.choice([3, 8, 70])
    conf = [
        {**p, "node": f"n{i % max(1, n // 2)}", **({"kv_events": f"tcp://h:{i}"} if vllm else {})}
        for i, p in enumerate(pods(n))
    ]
    routing = {
        "transfer_bytes_per_second": rng.choice([1e9, 1e12]),
        "replicas": rng.choice([1, 3]),
        "weights": {"balance": rng.choice([0.0, 0.1])},
    }
    doc = router_doc(conf, routing=routing, **({"engine": "vllm"} if vllm else {}))
    rc = RoutingCore(parse_config(doc))
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    domains = sorted(
        {p.domain for p in rc.pods.values()} | {p.shared or "" for p in rc.pods.values()} - {""}
    )
    rc.live_nodes = set(domains[: rng.randrange(len(domains) + 1)])
    base = [rng.randrange(50000) for _ in range(16 * 60)]
    for d in domains:
        if rng.random() < 0.5:
            rc.index.store(
                d, rc.hashes(base, "s")[: rng.randrange(60)], rng.choice(["device", "host"])
            )
    for p in rc.pods.values():
        p.inflight, p.decoding = rng.randrange(4), rng.randrange(3)
        p.queue_add(rng.choice([0, 500, 4000]), clock[0] - rng.random())
        p.note_sent(rng.choice([0, 300]))  # what a request of another router weighs
        if rng.random() < 0.5:
            p.note_engine(
                EngineLoad(rng.randrange(5), rng.randrange(5), rng.choice([None, 300])), clock[0]
            )
    rc.observe_ttft(rc.pods["p0"], 3000, 0.5, 0.0, 9)  # a learned interference
    rc.bandwidth[domains[0]] = 5e9
    if seed % 2:
        rc.observe_pull(rc.pods["p1"], 20, rng.choice([0.002, 0.03]))  # a learned pull latency
    for _ in range(6):
        toks = base[: 16 * rng.randrange(61)] + [
            rng.randrange(50000) for _ in range(rng.choice([0, 40, 300]))
        ]
        draws = random.Random()
        draws.setstate(rc._spread.getstate())
        want = reference_decision(rc, toks, clock[0], draws)
        d = rc.decide(toks, "s")
        costs = {name: cost for cost, name, _ in want}
        top = min(want, key=lambda t: (t[0], rc.pods[t[1]].inflight))
        assert d.est_ttft_s == costs[d.best.name] == top[0]
        assert [p.name for p in d.first(3)] == [p.name for p in d.ranked[:3]]
        assert sorted(costs[p.name] for p in d.ranked) == [costs[p.name] for p in d.ranked]
        peer = next(peer for _, name, peer in want if name == d.best.name)
        assert (d.pull.node if d.pull else "") == peer
        assert d.hashes == rc.hashes(toks, "s")
        rc.record_sent(
            d.best.domain, d.hashes, max(d.cached_blocks.values(), default=0), d.best.name
        )
        clock[0] += rng.choice([0.1, 1.5])


def test_the_mode_follows_every_change_of_the_live_streams() -> None:
    rc = core(n=3)
    assert rc.mode == "events"
    rc.live_nodes.discard("n1")
    assert rc.mode == "mixed"
    rc.live_nodes -= {"n0", "n2"}
    assert rc.mode == "approximate"
    rc.live_nodes.add("n1")
    assert rc.mode == "mixed"
    rc.live_nodes = {"n0", "n1", "n2"}
    assert rc.mode == "events"
    rc.live_nodes &= {"n0"}
    assert rc.mode == "mixed"
    rc.live_nodes.clear()
    assert rc.mode == "approximate"
    rc.live_nodes |= {"n0", "n1", "n2"}
    rc.apply_config(parse_config(router_doc(pods(2))))  # n2 left: the rest stay live
    assert rc.mode == "events" and rc.live_nodes == {"n0", "n1"}


def test_a_pod_that_joins_takes_what_the_others_learned_from_the_next_sample() -> None:
    rc = RoutingCore(parse_config(router_doc(pods(2))))
    rc.observe_ttft(rc.pods["p0"], 3000, 0.5, 0.0, 9)
    learned = (rc.pods["p0"].prefill_tps, rc.pods["p0"].usual_occupancy)
    assert (rc.pods["p1"].prefill_tps, rc.pods["p1"].usual_occupancy) == learned
    rc.apply_config(parse_config(router_doc(pods(3))))
    assert rc.pods["p2"].usual_occupancy == 0.0  # joined: only the rate so far
    rc.observe_ttft(rc.pods["p0"], 10, 0.5, 0.0)  # too small a sample to learn from ...
    assert rc.pods["p2"].usual_occupancy == learned[1]  # ... but it is shared


def test_request_path_counters_export_what_prometheus_client_would() -> None:
    """``router.counters``: the same text on a scrape as prometheus_client's own metrics
    given the same values (bucket edges included), less the ``_created`` samples."""
    import prometheus_client as pc
    from prometheus_client import CollectorRegistry, generate_latest

    from kvmarina.router import counters

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (1e-5, 1e-4, 0.5, 1, 10)
    h1 = counters.Histogram("x_seconds", "doc", buckets, registry=ours)
    h2 = pc.Histogram("x_seconds", "doc", buckets=buckets, registry=theirs)
    c1 = counters.Counter("y", "doc", ["pod", "code"], registry=ours)
    c2 = pc.Counter("y", "doc", ["pod", "code"], registry=theirs)
    for v in (0.0, 1e-5, 2e-5, 0.5, 0.7, 1.0, 3.0, 11.0):
        h1.observe(v)
        h2.observe(v)
    for labels, n in ((("p1", "200"), 2), (("p0", "503"), 1), (("p1", "200"), 0.5)):
        c1.labels(*labels).inc(n)
        c2.labels(*labels).inc(n)

    def lines(r: CollectorRegistry) -> set[str]:
        return {x for x in generate_latest(r).decode().splitlines() if "_created" not in x}

    assert lines(ours) == lines(theirs)
    with pytest.raises(ValueError, match="takes labels"):
        c1.labels("p0")


def test_replicas_spread_cold_prompts_where_one_router_picks_the_fastest() -> None:
    """Pods equal but for a learned rate: one router sends every cold prompt of an idle
    fleet to the fastest pod (nothing else tells them apart); a replica (``replicas`` >
    1) spreads them, so replicas that share nothing do not all queue on that pod. A
    prompt some pod holds still goes there."""
    picks: dict[int, collections.Counter[str]] = {}
    for replicas in (1, 2):
        rc = core(n=4, replicas=replicas)
        rc._spread.seed(7)
        rc.pods["p2"].prefill_tps *= 1.1
        picks[replicas] = collections.Counter(
            rc.decide([i * 1000 + k for k in range(64)], "s").best.name for i in range(200)
        )
        toks = list(range(1600))
        rc.index.store("n1", rc.hashes(toks, "s"), "device")
        assert rc.decide(toks, "s").best.name == "p1"
    assert picks[1] == {"p2": 200}
    assert len(picks[2]) == 4 and max(picks[2].values()) < 120
