"""The connector's parts that need no vLLM: the scheduler's plan against a real pool
(``LocalPool``: the agent's pool in-process), whole-block copies between paged KV
tensors of vLLM's layouts and agent pages, settings, and the agent session's
behaviour when no agent is there. The connector inside vLLM: ``tests/vllm``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvmarina.agent.client import LocalPool
from kvmarina.connector.agent_session import AgentSession
from kvmarina.connector.kv_blocks import LayoutMismatch, PagedKV, load_blocks, save_blocks
from kvmarina.connector.plan import Planner
from kvmarina.connector.settings import ConnectorConfigError, ConnectorSettings
from kvmarina.hashing import HashContract
from kvmarina.presets import write_preset_folder

BS = 4
IDENT = "m@main|L1/H1/D2/float32/B4|tp0of1|vllm-cpu"
EXTRA = {
    "agent_socket": "/nonexistent/agent.sock",
    "credential_file": "/nonexistent/token",
    "model_identity": IDENT,
    "hashing": {"block_size": BS},
    "budget": {"max": 1 << 20},
}


def session_on(pool: LocalPool, settings: ConnectorSettings | None = None) -> AgentSession:
    s = AgentSession(settings or ConnectorSettings.parse(EXTRA), pool.block_bytes, "test")
    s.client, s.boot_id = pool, str(pool.info["boot_id"])  # type: ignore[assignment]
    return s


def commit(pool: LocalPool, hashes: list[bytes]) -> None:
    slots = pool.lease(len(hashes))
    pool.commit([(p, i, h) for (p, i), h in zip(slots, hashes, strict=True)])
    pool.release(hashes)


def test_a_request_loads_the_agents_blocks_beyond_vllms_own_and_saves_the_rest() -> None:
    pool = LocalPool(64, 1 << 20)
    c = HashContract(BS)
    tokens = list(range(1, 19))  # 4 full blocks and 2 tokens
    ours = c.block_hashes(tokens, IDENT, "t")
    commit(pool, ours[:3])  # a sibling computed 3 blocks
    planner = Planner(c, IDENT, session_on(pool))
    # vLLM's own cache has the first block: the agent gives blocks 1 and 2
    assert planner.matched("r", tokens, "t", local_tokens=4) == 8
    planner.allocated("r", [10, 11, 12, 13, 14], external_tokens=8)
    plan = planner.step([("r", [10, 11, 12, 13, 14], 12)], [], {"r": 6})
    hits = pool.lookup(ours[:3])
    assert plan.loads == [(11, hits[1].page, hits[1].index), (12, hits[2].page, hits[2].index)]
    # this step computes tokens 12..17: block 3 becomes full and is saved under its hash
    assert plan.saves == [("r", 13, ours[3])] and plan.boot_id == pool.info["boot_id"]
    pool.release(ours[:3])
    # decoding fills block 4 a step later
    tokens += [19, 20]
    plan = planner.step([], [("r", None, 18, False)], {"r": 2})
    assert plan.saves == [("r", 14, c.block_hashes(tokens, IDENT, "t")[4])]
    assert planner.loaded_blocks == 2 and planner.saved_blocks == 2


def test_pins_last_until_the_loading_step_is_over() -> None:
    pool = LocalPool(64, 1 << 20)
    c = HashContract(BS)
    tokens = list(range(100, 113))
    ours = c.block_hashes(tokens, IDENT, "t")
    commit(pool, ours)
    planner = Planner(c, IDENT, session_on(pool))
    assert planner.matched("r", tokens, "t", 0) == 12  # 13 tokens: the 13th is computed
    # pinned: the agent cannot drop them while the worker reads
    assert pool._pool.index.blocks[(pool._sess.scope, ours[0])].refs > 0  # type: ignore[attr-defined]
    planner.allocated("r", [1, 2, 3, 4], 12)
    planner.step([("r", [1, 2, 3, 4], 12)], [], {"r": 1})
    planner.step_done()
    assert pool._pool.index.blocks[(pool._sess.scope, ours[0])].refs == 0  # type: ignore[attr-defined]
    # a request that vLLM could not schedule asks again: the first lookup's pins go
    planner.matched("q", tokens, "t", 0)
    planner.matched("q", tokens, "t", 0)
    planner.finished("q")
    assert pool._pool.index.blocks[(pool._sess.scope, ours[0])].refs == 0  # type: ignore[attr-defined]


def test_a_resumed_request_saves_into_its_new_blocks() -> None:
    pool = LocalPool(64, 1 << 20)
    c = HashContract(BS)
    tokens = list(range(1, 10))
    planner = Planner(c, IDENT, session_on(pool))
    assert planner.matched("r", tokens, "", 0) == 0
    planner.allocated("r", [5, 6, 7], 0)
    plan = planner.step([("r", [5, 6, 7], 0)], [], {"r": 4})
    assert [b for _, b, _ in plan.saves] == [5]
    # preempted, then back with other blocks: block 0 is in the agent already, block 1
    # is saved from its new place once computed again
    plan = planner.step([], [("r", [8, 9, 10], 0, True)], {"r": 9})
    assert [b for _, b, _ in plan.saves] == [9]


@pytest.mark.parametrize(
    "shape, dim",
    [((6, 2, 4, 8), 0), ((2, 6, 4, 2, 4), 1)],  # CPU [blocks, heads, bs, 2*dim]; CUDA [2, ...]
    ids=["cpu-layout", "flash-attn-layout"],
)
def test_blocks_round_trip_through_agent_pages_in_vllms_layouts(
    shape: tuple[int, ...], dim: int
) -> None:
    layers = {f"layer.{i}": torch.randn(shape) for i in range(3)}
    kv = PagedKV(layers, num_blocks=6)
    assert kv.dims == [dim] * 3
    per_layer = torch.zeros(shape).select(dim, 0).numel() * 4
    assert kv.block_bytes == 3 * per_layer
    pool = LocalPool(kv.block_bytes, 1 << 20)
    slots = pool.lease(2)
    save_blocks(kv, [1, 4], slots, pool.block)
    expect = {n: (t.select(dim, 1).clone(), t.select(dim, 4).clone()) for n, t in layers.items()}
    for t in layers.values():
        t.zero_()
    load_blocks(kv, [(3, *slots[0]), (0, *slots[1])], pool.block)
    for n, t in layers.items():
        assert torch.equal(t.select(dim, 3), expect[n][0])
        assert torch.equal(t.select(dim, 0), expect[n][1])
        assert not t.select(dim, 1).any()
    with pytest.raises(LayoutMismatch, match="no dimension of 7 blocks"):
        PagedKV(layers, num_blocks=7)


def test_settings_name_what_is_missing_and_resolve_auto(tmp_path: Path) -> None:
    with pytest.raises(ConnectorConfigError, match="lacks 'agent_socket'"):
        ConnectorSettings.parse({**EXTRA, "agent_socket": ""})
    with pytest.raises(ConnectorConfigError, match="hashing"):
        ConnectorSettings.parse({**EXTRA, "hashing": {"block_size": 4, "algorithm": "md5"}})
    folder = write_preset_folder("small", "float32", tmp_path)
    auto = {**EXTRA, "model_identity": "auto", "model_name": "s", "dtype": "float32",
            "kv_format": "vllm-cpu"}  # fmt: skip
    settings = ConnectorSettings.parse(auto, str(folder))
    assert settings.model_identity == "s@main|L4/H2/D32/float32/B4|tp0of1|vllm-cpu"
    with pytest.raises(ConnectorConfigError, match="needs the model folder"):
        ConnectorSettings.parse(auto)


def test_without_an_agent_nothing_is_found_and_it_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session = AgentSession(ConnectorSettings.parse(EXTRA), 64, "scheduler")
    planner = Planner(HashContract(BS), IDENT, session)
    with caplog.at_level(logging.WARNING, "kvmarina.connector"):
        for k in range(3):
            assert planner.matched(f"r{k}", list(range(20)), "", 0) == 0
    gone = [r for r in caplog.records if "computes every prefix itself" in r.message]
    assert len(gone) == 1 and "/nonexistent/token" in gone[0].message
