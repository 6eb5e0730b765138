"""Continuous batching: concurrent requests batch and give the same tokens as alone."""

from __future__ import annotations

import threading

import pytest

from kvmarina.engine.config import preset
from kvmarina.engine.kvstore import ContiguousStore
from kvmarina.engine.model import build_model
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


def test_prompt_blocks_committed_meanwhile_are_adopted_not_recomputed() -> None:
    """Two requests with one new prefix admitted together: the second one's lookup
    found nothing, but by the time its prefill starts the first has committed the
    prefix; it takes those blocks and its output is what it would be alone."""
    from kvmarina.agent.client import LocalPool
    from kvmarina.engine.paged import PagedStore
    from kvmarina.hashing import HashContract

    cfg = preset("tiny")
    model = build_model(cfg, seed=11)
    layout = cfg.kv_layout(16)
    pool = LocalPool(layout.bytes_per_block, 16 * 2**20)
    store = PagedStore(pool, layout, HashContract(16), "tiny@main")
    sched = Scheduler(model, store, eos_id=None, max_batch=2, step_tokens=64)
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
