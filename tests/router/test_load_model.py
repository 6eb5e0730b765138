"""The router's load model: decoding sequences cost a new request little, engines'
own load figures count what other routers sent, and the interference is learned."""

from __future__ import annotations

import time

from kvmarina.load_report import EngineLoad, format_load, parse_load_header
from kvmarina.router.engine_load import parse_load
from kvmarina.router.pods import MAX_INTERFERENCE

from .test_units import core


def test_engine_load_is_read_from_each_engine_kind() -> None:
    ours = "# HELP x\nkvmarina_engine_running 3.0\nkvmarina_engine_waiting 2.0\n"
    vllm = (
        'vllm:num_requests_running{engine="0",model_name="m a"} 5.0\n'
        'vllm:num_requests_running{engine="1",model_name="m a"} 1.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m a"} 4.0\n'
        "vllm:gpu_cache_usage_perc 0.5\n"
    )
    sim = "kvmarina_sim_requests_running 7\nkvmarina_sim_requests_waiting 0\n"
    assert parse_load(ours) == EngineLoad(3, 2)
    assert parse_load(vllm) == EngineLoad(6, 4)
    assert parse_load(sim) == EngineLoad(7, 0)
    assert parse_load("other_metric 1\n") is None and parse_load("") is None


def test_a_pod_busy_decoding_stays_preferred_for_its_prefix() -> None:
    """Decoding occupies an engine without queueing a new prompt behind it: the pod
    holding a prefix keeps it while its prefill server is free."""
    rc = core()
    toks = list(range(1600))
    hs = rc.hashes(toks, "s")
    rc.index.store("n2", hs, "device")
    holder = rc.pods["p2"]
    holder.inflight = holder.decoding = 40  # all past their first token
    holder.interference = 0.005
    assert rc.decide(toks, "s").ranked[0].name == "p2"


def test_other_routers_load_reported_by_the_engine_counts() -> None:
    rc = core()
    toks = list(range(1600))
    rc.index.store("n2", rc.hashes(toks, "s"), "device")
    holder = rc.pods["p2"]
    holder.note_sent(400_000)  # what a request costs here
    assert rc.decide(toks, "s").ranked[0].name == "p2"
    now = time.monotonic()
    holder.note_engine(EngineLoad(running=1, waiting=8), now)
    assert holder.others_waiting(now) == 8 * 400_000
    assert rc.decide(toks, "s").ranked[0].name != "p2"  # another router's queue
    # ... which the engine works off meanwhile, as fast as it prefills
    assert holder.others_waiting(now + 1.0) == 8 * 400_000 - holder.prefill_tps
    holder.engine_at -= 60  # a stale figure is not used
    assert holder.others_waiting(time.monotonic()) == 0


def test_our_requests_answered_while_the_engine_was_polled_are_not_read_as_others() -> None:
    """vLLM renders /metrics in 7-11 ms: a request of ours whose first byte came in
    that time was counted waiting, but is no longer prefilling in our books."""
    rc = core()
    pod = rc.pods["p0"]
    pod.note_sent(300)
    pod.inflight, pod.decoding = 3, 0
    asked = pod.inflight - pod.decoding  # three of ours waiting as the poll went out
    pod.decoding = 2  # two first bytes came while it ran
    now = time.monotonic()
    pod.note_engine(EngineLoad(running=0, waiting=3), now, asked)
    assert pod.others_waiting(now) == 0.0
    pod.note_engine(EngineLoad(running=0, waiting=3), now)  # without the count at asking
    assert pod.others_waiting(now) == 2 * 300


def test_interference_is_learned_from_ttfts_and_shared() -> None:
    rc = core()
    pod = rc.pods["p0"]
    tps = pod.prefill_tps
    for _ in range(200):
        # a prefill took 1.2x as long with 30 sequences decoding as with 10: 1 % each
        rc.observe_ttft(pod, int(tps), 1.0, 0.0, occupancy=10)
        rc.observe_ttft(pod, int(tps), 1.2, 0.0, occupancy=30)
    assert 0.005 < pod.interference < 0.015, pod.interference
    assert rc.pods["p1"].interference == pod.interference
    assert 15 < pod.usual_occupancy < 25
    busy, idle = rc.pods["p1"], rc.pods["p2"]
    busy.decoding, idle.decoding = 40, 0
    now = time.monotonic()
    assert busy.slowdown(now) > 1.0 > idle.slowdown(now)
    rc.observe_ttft(pod, int(tps), 100.0, 0.0, occupancy=40)  # an outlier
    assert pod.interference <= MAX_INTERFERENCE


def test_the_load_header_round_trips_and_bad_values_are_ignored() -> None:
    load = EngineLoad(3, 1, 2048)
    assert parse_load_header(format_load(load)) == load
    assert parse_load_header("running=3;waiting=1") == EngineLoad(3, 1)
    assert parse_load_header("running=x;waiting=1") is None
    assert parse_load_header("") is None and parse_load_header(None) is None


def test_another_routers_queue_reported_in_tokens_drains_at_the_prefill_rate() -> None:
    rc = core()
    pod = rc.pods["p0"]
    now = time.monotonic()
    pod.note_engine(EngineLoad(1, 2, int(pod.prefill_tps)), now)  # 1 s of others' work
    for t, left in ((0.0, pod.prefill_tps), (0.5, pod.prefill_tps / 2), (2.0, 0.0)):
        assert abs(rc.queued(pod, now + t) - left) < 1


def test_two_routers_queues_on_one_pod_drain_at_one_servers_rate() -> None:
    """This router and another each have 1 s of prefill queued on a pod: half a
    second later 1.5 s are left, not 1 s (each share drained on its own as if the
    engine had two prefill servers). What this router sends after the report comes
    on top of it."""
    rc = core(replicas=2)
    pod = rc.pods["p0"]
    tps = pod.prefill_tps
    now = time.monotonic()
    pod.queue_add(int(tps), now)
    pod.note_engine(EngineLoad(1, 1, int(2 * tps)), now)
    assert abs(rc.queued(pod, now + 0.5) - 1.5 * tps) < 1
    pod.queue_add(int(tps), now + 0.5)
    assert abs(rc.queued(pod, now + 0.5) - 2.5 * tps) < 1
    # an engine that reports less than this router knows it sent: ours is the floor
    pod.note_engine(EngineLoad(1, 0, 0), now + 0.5)
    assert rc.queued(pod, now + 0.5) == pod.queue_ahead(now + 0.5) > 0


def test_a_replica_counts_its_own_queue_once_per_replica_until_the_engine_reports() -> None:
    """Replicas behind a Service each see about 1/N of the requests: without a report
    from the engine, a replica's own queue stands for N times as much. A fresh report
    of the engine's whole queue wins, whether it says more or less."""
    one, three = core(), core(replicas=3)
    now = time.monotonic()
    for rc in (one, three):
        rc.pods["p0"].queue_add(3000, now)
    assert three.queued(three.pods["p0"], now) == 3 * one.queued(one.pods["p0"], now) > 0
    three.pods["p0"].note_engine(EngineLoad(0, 9, 20000), now)
    assert three.queued(three.pods["p0"], now) > 3 * one.queued(one.pods["p0"], now)
    # the engine holds only this replica's 3,000 tokens: the other replicas sent none
    three.pods["p0"].note_engine(EngineLoad(0, 1, 3000), now)
    assert three.queued(three.pods["p0"], now) == one.queued(one.pods["p0"], now)


def test_a_prompt_on_its_way_draws_requests_that_share_its_prefix() -> None:
    """The engine answers after its prefill, and only then does ``record_sent`` say
    where the prompt went: a request sharing the prefix that comes meanwhile must
    see the pod computing it (it waits for those blocks there instead of computing
    them again elsewhere). Asking a decision about a pod records nothing by itself:
    the record comes once the request is written (``chain.all``, the forwarder's)."""
    rc = core()
    first = list(range(1600))
    d = rc.decide(first, "s")
    pod = d.ranked[0]
    d.uncached_tokens(pod, len(first), 16)
    follow = first + list(range(5000, 5100))  # the next turn of the conversation
    assert rc.decide(follow, "s").cached_blocks == {}  # only asked: nothing on its way
    assert d.chain.all() == rc.hashes(first, "s")  # written to the pod: recorded
    d2 = rc.decide(follow, "s")
    assert d2.ranked[0] is pod and d2.cached_blocks == {pod.domain: 100}
    d.chain.all()  # a second call (no new attempt) records nothing more
    assert len(rc._recent_log) == 1
