"""The agent's ``/stats`` contract: what a real pool writes reads back whole, and a document
that is not what an agent writes is refused with the field named."""

from __future__ import annotations

import pytest

from kvmarina.agent.client import LocalPool
from kvmarina.agent_stats import AgentStats, StatsError


def test_what_the_pool_writes_reads_back_whole() -> None:
    pool = LocalPool(64, 1 << 20)
    slots = pool.lease(2)
    pool.commit([(p, i, bytes([k]) * 16) for k, (p, i) in enumerate(slots)])
    pool.lookup([b"\x00" * 16, b"\x07" * 16])
    doc = pool.stats()
    stats = AgentStats.from_wire(doc)
    assert stats.to_wire() == doc
    assert stats.blocks["device"] == 2 and stats.pages["device"].used >= 1
    assert (stats.hit_blocks, stats.asked_blocks) == (1, 2)


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda d: d.pop("seq"), "/stats has no seq"),
        (lambda d: d["pages"]["host"].pop("total"), "/stats has no pages.host.total"),
        (lambda d: d["blocks"].update(device=-1), "/stats blocks.device is -1, not a count"),
        (lambda d: d.update(event_lag="3"), "/stats event_lag is '3', not a count"),
        (lambda d: d.update(stats=[1]), "/stats stats is [1], not an object"),
    ],
)
def test_a_document_that_is_not_an_agents_is_refused_by_field(change, says) -> None:  # type: ignore[no-untyped-def]
    doc = LocalPool(64, 1 << 20).stats()
    change(doc)
    with pytest.raises(StatsError, match=says.replace("[", r"\[").replace("]", r"\]")):
        AgentStats.from_wire(doc)


def test_older_agents_leave_the_event_figures_out() -> None:
    doc = LocalPool(64, 1 << 20).stats()
    for key in ("subscribers", "event_lag", "resyncs"):
        doc.pop(key)
    stats = AgentStats.from_wire(doc)
    assert stats.event_lag is None and "event_lag" not in stats.to_wire()
