"""The connector's background saves (``BlockSaver``) against a real in-process pool: blocks
land in the agent after the caller has moved on, vLLM gets back exactly the finished
requests it waits for and only once their saves are over, a preemption waits for its
request's saves, and a failing save loses only the cached copy. And the scheduler's
claims: a second engine waits for blocks the first is computing, until they are
committed or the first gives them up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from kvmarina.agent.client import LocalPool
from kvmarina.connector import plan as plan_mod
from kvmarina.connector.kv_blocks import PagedKV, save_blocks
from kvmarina.connector.plan import Planner
from kvmarina.connector.saver import BlockSaver
from kvmarina.hashing import HashContract

from .test_connector_parts import BS, IDENT, commit, session_on

BLOCKS = 8


class GatedStore:
    """The connector's store (lease, copy from vLLM's KV, commit) into a real pool,
    held at ``gate`` so a test can look at the saver while a save is in flight."""

    def __init__(self) -> None:
        self.kv = PagedKV({"l0": torch.randn(BLOCKS, 2, BS, 4)}, BLOCKS)
        self.pool = LocalPool(self.kv.block_bytes, 1 << 20)
        self.gate = threading.Event()
        self.thread: str | None = None

    def __call__(self, saves: Sequence[tuple[int, bytes]]) -> None:
        self.thread = threading.current_thread().name
        assert self.gate.wait(10)
        slots = self.pool.lease(len(saves))
        save_blocks(self.kv, [b for b, _ in saves], slots, self.pool.block)
        placed = self.pool.commit([(p, i, h) for (p, i), (_, h) in zip(slots, saves, strict=True)])
        self.pool.release([hit.hash for hit in placed])


def hashes(n: int, salt: str = "s") -> list[bytes]:
    return HashContract(BS).block_hashes(list(range(1, n * BS + 1)), IDENT, salt)


def test_saves_land_after_the_caller_moved_on_and_vllm_waits_for_them() -> None:
    store = GatedStore()
    saver = BlockSaver(store)
    hs = hashes(3)
    saver.submit([("r", 0, hs[0]), ("r", 1, hs[1])])
    saver.submit([("r", 2, hs[2]), ("q", 3, hashes(1, "q")[0])])
    # the request finished before its saves are over: vLLM keeps its blocks
    assert saver.finished_sending({"r", "never-saved"}) == set()
    assert store.pool.lookup(hs) == []
    store.gate.set()
    assert saver.drain(10)
    assert store.thread == "kvmarina-saver"
    assert saver.finished_sending(set()) == {"r"}  # told before, handed back once
    assert saver.finished_sending({"r"}) == set()
    hits = store.pool.lookup(hs)
    assert len(hits) == 3
    for k, hit in enumerate(hits):  # the agent holds vLLM's bytes of each block
        got = torch.empty(store.kv.block_bytes, dtype=torch.uint8)
        store.kv.read(k, got)
        assert torch.equal(store.pool.block(hit.page, hit.index), got)
    assert saver.finished_sending({"q"}) == {"q"} and saver.saved_blocks == 4
    saver.close()


def test_a_preempted_request_waits_for_its_saves() -> None:
    store = GatedStore()
    saver = BlockSaver(store)
    saver.submit([("r", 0, hashes(1)[0])])
    assert not saver.wait_for({"r"}, timeout=0.05)
    assert saver.wait_for({"other"}, timeout=0)  # nothing of its own in flight
    store.gate.set()
    assert saver.wait_for({"r"}, timeout=10)
    saver.close()


def test_a_failing_save_loses_the_copy_not_the_request(caplog: pytest.LogCaptureFixture) -> None:
    def store(saves: Sequence[tuple[int, bytes]]) -> None:
        raise RuntimeError("agent pages gone")

    saver = BlockSaver(store)
    with caplog.at_level(logging.ERROR, "kvmarina.connector"):
        saver.submit([("r", 0, b"x" * 16)])
        saver.submit([("r", 1, b"y" * 16)])
        assert saver.drain(10)
    assert saver.failed_jobs == 2 and saver.saved_blocks == 0
    assert [r.getMessage() for r in caplog.records] == [
        "kvmarina connector: saving 1 blocks failed"
    ]
    assert saver.finished_sending({"r"}) == {"r"}
    saver.close()


def test_without_kv_caches_requests_are_only_recorded() -> None:
    saver = BlockSaver(None)
    saver.submit([("r", 0, b"x" * 16)])
    assert saver.pending == {} and saver.finished_sending({"r", "q"}) == {"r"}


def test_the_scheduler_keeps_blocks_of_exactly_the_requests_it_planned_saves_for() -> None:
    pool = LocalPool(64, 1 << 20)
    planner = Planner(HashContract(BS), IDENT, session_on(pool))
    tokens = list(range(1, 12))  # 2 full blocks and 3 tokens
    planner.matched("r", tokens, "t", local_tokens=0)
    planner.matched("idle", tokens, "t", local_tokens=0)
    plan = planner.step([("r", [4, 5, 6], 0)], [], {"r": 11}, frozenset({"p"}))
    assert [(r, b) for r, b, _ in plan.saves] == [("r", 4), ("r", 5)]
    assert plan.preempted == {"p"}
    planner.matched("r", tokens, "t", local_tokens=0)  # preempted and admitted again
    assert planner.finished("r") is True
    assert planner.finished("idle") is False and planner.finished("unknown") is False


def ask(planner: Planner, req: str, tokens: list[int]) -> int | None:
    time.sleep(plan_mod.ASK_EVERY_S)  # asked again no sooner than this
    return planner.matched(req, tokens, "t", local_tokens=0)


def test_a_second_engine_waits_for_blocks_the_first_is_computing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pool = LocalPool(64, 1 << 20)
    contract = HashContract(BS)
    a = Planner(contract, IDENT, session_on(pool))
    b = Planner(contract, IDENT, session_on(pool.sibling()))
    tokens = list(range(1, 12))  # 2 full blocks and 3 tokens
    assert a.matched("r", tokens, "t", local_tokens=0) == 0  # a computes them: claimed
    assert ask(b, "q", tokens) is None and "q" in b.waiting  # vLLM asks again next step
    commit(pool.sibling(), contract.block_hashes(tokens[:8], IDENT, "t"))  # a's worker
    assert ask(b, "q", tokens) == 8 and "q" not in b.waiting  # loaded, not computed
    b.finished("q")

    # the request ends before computing anything: its claims end with it
    fresh = list(range(100, 111))
    assert a.matched("r2", fresh, "t", local_tokens=0) == 0
    assert ask(b, "q2", fresh) is None
    assert a.finished("r2") is False
    assert ask(b, "q2", fresh) == 0  # b computes them now
    b.finished("q2")

    # a save was planned: the claims last until vLLM hears the saves are over
    other = list(range(200, 211))
    a.matched("r3", other, "t", local_tokens=0)
    a.step([("r3", [1, 2, 3], 0)], [], {"r3": 11})
    assert a.finished("r3") is True
    assert ask(b, "q3", other) is None
    a.sends_done(["r3"])  # the save failed: nothing committed, no claim left
    assert ask(b, "q3", other) == 0

    # a claimer that never commits is waited for at most PEER_WAIT_S
    stuck = list(range(300, 311))
    a.matched("r4", stuck, "t", local_tokens=0)
    monkeypatch.setattr(plan_mod, "PEER_WAIT_S", 0.0)
    with caplog.at_level(logging.WARNING, "kvmarina.connector"):
        assert ask(b, "q4", stuck) == 0
    assert "waited 0s for 2 blocks another engine claimed" in caplog.text
