"""Continuous batching: concurrent requests batch and give the same tokens as alone."""

from __future__ import annotations

import threading

import pytest

from kvmarina.engine.config import preset
from kvmarina.engine.kvstore import ContiguousStore
from kvmarina.engine.model import build_model
from kvmarina.engine.paged import PagedStore
from kvmarina.engine.sampling import SamplingParams
from kvmarina.engine.scheduler import Output, QueueFull, Scheduler, Sequence


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()

    def __call__(self, out: Output) -> None:
        if out.token is not None:
            self.tokens.append(out.token)
        if out.finish_reason is not None:
            self.reason = out.finish_reason
            self.done.set()


def run_all(prompts: list[list[int]], max_batch: int, step_tokens: int) -> list[Collector]:
    model = build_model(preset("tiny"), seed=11)
    sched = Scheduler(
        model,
        ContiguousStore(model.config.num_layers),
        eos_id=None,
        max_batch=max_batch,
        step_tokens=step_tokens,
    )
    sched.start()
    cols = [Collector() for _ in prompts]
    try:
        for p, c in zip(prompts, cols, strict=True):
            sched.submit(Sequence(p, SamplingParams(max_tokens=8, temperature=0.0), c))
        for c in cols:
            assert c.done.wait(60)
    finally:
        sched.stop()
    return cols


def test_batched_equals_alone() -> None:
    prompts = [list(range(5, 5 + n)) for n in (40, 7, 90)]
    together = run_all(prompts, max_batch=8, step_tokens=32)
    alone = [run_all([p], max_batch=1, step_tokens=4096)[0] for p in prompts]
    for t, a in zip(together, alone, strict=True):
        assert t.tokens == a.tokens and len(t.tokens) == 8
        assert t.reason == "length"


def test_waiting_queue_is_bounded() -> None:
    model = build_model(preset("tiny"), seed=11)
    sched = Scheduler(model, ContiguousStore(2), eos_id=None, max_waiting=2)
    # not started: nothing drains the queue
    for _ in range(2):
        sched.submit(Sequence([1, 2], SamplingParams(), Collector()))
    with pytest.raises(QueueFull):
        sched.submit(Sequence([1, 2], SamplingParams(), Collector()))


def test_reclaim_returns_reserved_blocks_and_decoding_goes_on() -> None:
    """The agent asks for blocks back: the engine returns slots reserved for tokens
    not generated yet, re-leases them as it grows, and the output is unchanged."""
    from kvmarina.agent.client import LocalPool
    from kvmarina.engine.paged import PagedStore
    from kvmarina.hashing import HashContract

    cfg = preset("tiny")
    model = build_model(cfg, seed=11)
    layout = cfg.kv_layout(16)

    def run(reclaim: bool) -> list[int]:
        pool = LocalPool(layout.bytes_per_block, 16 * 2**20)
        store = PagedStore(pool, layout, HashContract(16), "tiny@main")
        sched = Scheduler(model, store, eos_id=None, max_batch=2, step_tokens=64)
        col = Collector()
        sched.submit(Sequence(list(range(40)), SamplingParams(max_tokens=60, temperature=0.0), col))
        steps = 0
        while not col.done.is_set():
            sched.step()
            steps += 1
            if reclaim and steps == 3:
                held = sum(len(s.leased) for s in store.seqs.values())
                store._on_reclaim(100)
                assert sum(len(s.leased) for s in store.seqs.values()) < held
                assert store.reclaimed > 0
        return col.tokens

    assert run(reclaim=True) == run(reclaim=False)


def _engines_on_one_node(n: int, step_tokens: int) -> list[tuple[Scheduler, PagedStore]]:
    """``n`` engines (scheduler and paged store each) on one node's pool."""
    from kvmarina.agent.client import LocalPool
    from kvmarina.hashing import HashContract

    cfg = preset("tiny")
    model = build_model(cfg, seed=11)
    layout = cfg.kv_layout(16)
    pool = LocalPool(layout.bytes_per_block, 16 * 2**20)  # the node's agent, shared
    clients = [pool] + [pool.sibling() for _ in range(n - 1)]  # a session per engine
    stores = [PagedStore(c, layout, HashContract(16), "tiny@main") for c in clients]
    return [
        (Scheduler(model, st, eos_id=None, max_batch=2, step_tokens=step_tokens), st)
        for st in stores
    ]


def test_prompt_blocks_committed_meanwhile_are_adopted_not_recomputed() -> None:
    """Two requests with one new prefix admitted together: the second one's lookup
    found nothing, but by the time its prefill starts the first has committed the
    prefix; it takes those blocks and its output is what it would be alone."""
    ((sched, store),) = _engines_on_one_node(1, step_tokens=64)
    prompt = list(range(3, 203))
    cols = [Collector(), Collector()]
    seqs = [Sequence(prompt, SamplingParams(max_tokens=6, temperature=0.0), c) for c in cols]
    for seq in seqs:
        sched.submit(seq)
    while not all(c.done.is_set() for c in cols):
        sched.step()
    assert seqs[0].cached_len == 0
    # every full block but the last prompt token's: 199 // 16 = 12 blocks
    assert seqs[1].cached_len == 12 * 16 and store.adopted_blocks == 12
    alone = run_all([prompt], max_batch=1, step_tokens=4096)[0]
    assert cols[0].tokens == cols[1].tokens == alone.tokens[:6]


def test_a_prefix_an_earlier_request_is_computing_is_waited_for_not_computed_twice() -> None:
    """A conversation's next turn arrives while its previous turn is still
    prefilling on this engine. Computing in the same step as the last chunk of
    that prefill would compute the shared part twice and forfeit the hit; instead
    the next turn waits a step, adopts those blocks, and gives what it gives alone."""
    ((sched, _),) = _engines_on_one_node(1, step_tokens=128)
    first = list(range(3, 203))  # 200 tokens: 128 in step 1, the last 72 in step 2
    second = [*first, *range(60, 100)]
    cols = [Collector(), Collector()]
    seqs = [
        Sequence(p, SamplingParams(max_tokens=6, temperature=0.0), c)
        for p, c in zip((first, second), cols, strict=True)
    ]
    for seq in seqs:
        sched.submit(seq)
    while not all(c.done.is_set() for c in cols):
        sched.step()
    assert seqs[0].cached_len == 0
    assert seqs[1].cached_len == 12 * 16  # the first prompt's full blocks, adopted
    alone = run_all([second], max_batch=1, step_tokens=4096)[0]
    assert cols[1].tokens == alone.tokens[:6]


@pytest.mark.parametrize("claimer", ["computes", "is-cancelled", "waited-too-long"])
def test_a_prefix_a_sibling_engine_is_computing_is_waited_for_not_computed_twice(
    claimer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine B gets the next turn while engine A (same node) is still prefilling the
    previous one. A's lookup claimed the blocks it computes, so B's lookup learns
    that A is computing them: B waits and adopts them as A commits. If A's request
    is cancelled its claims go with it, and past PEER_WAIT_S B stops waiting: in
    both cases B computes the rest itself. B's output is what it is alone."""
    from kvmarina.engine import scheduler as sched_mod

    if claimer == "waited-too-long":
        monkeypatch.setattr(sched_mod, "PEER_WAIT_S", 0.0)
    (a, _), (b, b_store) = _engines_on_one_node(2, step_tokens=64)
    first = list(range(3, 203))
    second = [*first, *range(60, 100)]
    cols = [Collector(), Collector()]
    s_a = Sequence(first, SamplingParams(max_tokens=6, temperature=0.0), cols[0])
    s_b = Sequence(second, SamplingParams(max_tokens=6, temperature=0.0), cols[1])
    a.submit(s_a)
    a.step()  # A is admitted, claims its 12 blocks, computes and commits 4
    b.submit(s_b)
    b.step()  # B finds 4 blocks, and 8 more that A is computing
    if claimer == "is-cancelled":
        a.cancel(s_a)
        a.step()
    while not cols[1].done.is_set():
        if claimer == "computes":
            a.step()
        b.step()
    if claimer == "computes":  # all of A's prompt blocks: found at admission or adopted
        assert s_b.cached_len == 12 * 16 and b_store.adopted_blocks == 8
    else:  # B computed the rest of the shared prefix itself
        assert s_b.cached_len == 4 * 16 and b_store.adopted_blocks == 0
    alone = run_all([second], max_batch=1, step_tokens=4096)[0]
    assert cols[1].tokens == alone.tokens[:6]


def test_a_store_that_cannot_adopt_blocks_never_waits_for_them() -> None:
    model = build_model(preset("tiny"), seed=11)
    sched = Scheduler(model, ContiguousStore(model.config.num_layers), eos_id=None)
    col = Collector()
    seq = Sequence(list(range(3, 100)), SamplingParams(max_tokens=2, temperature=0.0), col)
    sched.submit(seq)
    for _ in range(10):  # one prefill step and one decode step, not an hour
        sched.step()
    assert col.done.is_set() and seq.cached_len == 0


def test_a_short_prompt_is_not_held_behind_a_long_prefill_and_the_long_one_still_progresses() -> (
    None
):
    """A step takes the shortest remaining prefill first: a follow-up turn's few new
    tokens get their first token in the next step, not after every chunk of a long
    prompt admitted before them. The oldest prefill keeps a quarter of each step,
    so a stream of short prompts never starves it. Outputs are what they are alone."""
    model = build_model(preset("tiny"), seed=11)
    sched = Scheduler(
        model, ContiguousStore(model.config.num_layers), eos_id=None, max_batch=8, step_tokens=64
    )
    params = SamplingParams(max_tokens=2, temperature=0.0)
    long_col = Collector()
    long_seq = Sequence([3 + i % 250 for i in range(400)], params, long_col)
    sched.submit(long_seq)
    sched.step()
    assert long_seq.computed == 64
    shorts = [Collector() for _ in range(4)]
    prompts = [[5 + i, *range(40, 59)] for i in range(4)]  # 20 tokens each
    for prompt, col in zip(prompts, shorts, strict=True):
        sched.submit(Sequence(prompt, params, col))
    sched.step()  # 64 tokens: two short prompts (40), 8 of a third, 16 of the long one
    assert [len(c.tokens) for c in shorts] == [1, 1, 0, 0]
    assert long_seq.computed == 64 + 16
    while not all(c.done.is_set() for c in [long_col, *shorts]):
        sched.step()
    alone = run_all([*prompts, long_seq.prompt], max_batch=1, step_tokens=4096)
    assert [c.tokens for c in shorts] == [a.tokens[:2] for a in alone[:4]]
    assert long_col.tokens == alone[4].tokens[:2]


class ReportingStore(ContiguousStore):
    """A contiguous store that keeps the load reports the scheduler makes."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.reports: list[tuple[int, int]] = []

    def report_load(self, running: int, waiting: int) -> None:
        self.reports.append((running, waiting))


def test_the_scheduler_reports_its_load_when_it_changes() -> None:
    """(running, waiting) go to the store (the agent, then the routers) as requests
    are admitted and finish, once per change: a step that changes nothing says nothing."""
    model = build_model(preset("tiny"), seed=11)
    store = ReportingStore(model.config.num_layers)
    sched = Scheduler(model, store, eos_id=None, max_batch=1, step_tokens=64)
    cols = [Collector() for _ in range(3)]
    for c in cols:  # queued before the loop starts: one runs, two wait
        sched.submit(Sequence(list(range(1, 40)), SamplingParams(max_tokens=6), c))
    sched.start()
    try:
        for c in cols:
            assert c.done.wait(60)
    finally:
        sched.stop()
    assert store.reports[0] == (1, 2) and store.reports[-1] == (0, 0)
    assert (1, 1) in store.reports and (1, 0) in store.reports
    assert all(a != b for a, b in zip(store.reports, store.reports[1:], strict=False))
