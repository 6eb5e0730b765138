"""Status figures: an agent's /stats and the engines' /metrics mapped to status fields,
and every status the operator writes validating against the CRDs' status schemas."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from kvmarina.agent.node.pool import Pool
from kvmarina.crd import closed, schema_for_kind
from kvmarina.operator import status as st

PAGE = 2 * 2**20


def stats_doc(**over: Any) -> dict[str, Any]:
    """A /stats answer in the shape ``kvmarina.agent`` serves (``Pool.summary``)."""
    doc: dict[str, Any] = {
        "node": "node-a",
        "boot_id": "b00t",
        "seq": 41,
        "pages": {"device": {"total": 100, "used": 30}, "host": {"total": 50, "used": 5}},
        "blocks": {"device": 120, "host": 7},
        "sessions": 2,
        "reserved_pages": 0,
        "usage": {"default/tiny": 120},
        "stats": {"lookups": 9, "hit_blocks": 30, "miss_blocks": 10},
        "subscribers": 1,
    }
    doc.update(over)
    return doc


def sample(node: str = "node-a", doc: Any = None, **over: Any) -> st.AgentSample:
    """An agent pod that answered ``doc`` (default ``stats_doc()``); ``over`` replaces
    fields, e.g. ``body=None, error=...`` for one that did not answer."""
    fields: dict[str, Any] = {
        "node": node,
        "pod": f"agent-{node}",
        "pod_ready": True,
        "url": f"http://10.0.0.1:7470/stats#{node}",
        "body": json.dumps(stats_doc() if doc is None else doc),
    }
    fields.update(over)
    return st.AgentSample(**fields)


def validate_status(kind: str, status: dict[str, Any]) -> None:
    schema = closed(schema_for_kind(kind))["properties"]["status"]
    jsonschema.Draft4Validator(schema).validate(status)


def test_stats_map_to_tiers_blocks_hits_and_index_health() -> None:
    entry, hits, asked = st.agent_entry(sample(), PAGE)
    assert entry == {
        "node": "node-a",
        "pod": "agent-node-a",
        "ready": True,
        "device": {"capacityBytes": 100 * PAGE, "usedBytes": 30 * PAGE, "blocks": 120},
        "host": {"capacityBytes": 50 * PAGE, "usedBytes": 5 * PAGE, "blocks": 7},
        "blocks": 127,
        "hitRate": 0.75,
        "sessions": 2,
        "index": {"bootId": "b00t", "lastEventSeq": 41, "subscribers": 1},
    }
    assert (hits, asked) == (30, 40)


def test_event_lag_and_resyncs_are_taken_when_the_agent_reports_them() -> None:
    entry, _, _ = st.agent_entry(sample(doc=stats_doc(event_lag=3, resyncs=2)), PAGE)
    assert entry["index"] == {
        "bootId": "b00t",
        "lastEventSeq": 41,
        "eventLag": 3,
        "resyncs": 2,
        "subscribers": 1,
    }


def test_a_real_pools_summary_maps_cleanly() -> None:
    pool = Pool(
        node="n1", backend="cpu", page_size=4096, device_pages=8, host_pages=4, policy="lru"
    )
    body = json.dumps(pool.summary())  # what /stats serves, through JSON
    entry, _, asked = st.agent_entry(sample("n1", doc=json.loads(body)), 4096)
    assert entry["ready"] is True and asked == 0
    assert entry["device"]["capacityBytes"] == 8 * 4096
    assert entry["host"]["capacityBytes"] == 4 * 4096
    assert entry["index"]["bootId"] == pool.events.boot_id
    assert "hitRate" in entry and entry["hitRate"] is None  # nothing asked yet


@pytest.mark.parametrize(
    ("over", "reason", "says"),
    [
        ({"url": None, "body": None}, st.NO_IP, "no IP"),
        ({"body": None, "error": "no answer within 2 s"}, st.UNREACHABLE, "within 2 s"),
        ({"body": "<html>"}, st.BAD_STATS, "Expecting value"),
        ({"body": json.dumps([1])}, st.BAD_STATS, "not an object"),
        ({"body": json.dumps(stats_doc(seq=-1))}, st.BAD_STATS, "seq is -1"),
        ({"body": json.dumps(stats_doc(pages={}))}, st.BAD_STATS, "no pages.device.total"),
    ],
)
def test_an_agent_that_cannot_be_read_is_not_ready_with_a_reason(
    over: dict[str, Any], reason: str, says: str
) -> None:
    entry, hits, asked = st.agent_entry(sample(**over), PAGE)
    assert entry["ready"] is False and entry["reason"] == reason
    assert says in entry["message"], entry["message"]
    assert (hits, asked) == (0, 0)
    validate_status("KVCachePool", {"nodes": [entry]})


def test_an_answering_agent_whose_pod_is_not_ready_keeps_its_figures() -> None:
    entry, _, _ = st.agent_entry(sample(pod_ready=False), PAGE)
    assert entry["ready"] is False and entry["reason"] == st.NOT_READY
    assert entry["blocks"] == 127


def test_pool_totals_weigh_hits_by_lookups_and_skip_unreachable_agents() -> None:
    b = stats_doc(blocks={"device": 3, "host": 0})
    b["stats"] = {"hit_blocks": 0, "miss_blocks": 60}
    unreachable = sample("node-c", body=None, error="refused")
    figures = st.pool_figures([sample("node-b", doc=b), sample("node-a"), unreachable], PAGE)
    assert [n["node"] for n in figures["nodes"]] == ["node-a", "node-b", "node-c"]
    assert figures["blocks"] == 127 + 3
    assert figures["hitRate"] == 0.3  # (30 + 0) / (40 + 60), not the mean of 0.75 and 0
    assert "node-c: Unreachable" in st.unhealthy_agents(figures["nodes"])
    validate_status("KVCachePool", {**figures, "servings": 1})


def test_one_entry_per_node_the_ready_pod_speaking_for_it() -> None:
    old = sample(pod="agent-old", body=None, error="terminating")
    new = sample(pod="agent-new")
    figures = st.pool_figures([old, new], PAGE)
    assert [(n["node"], n["pod"]) for n in figures["nodes"]] == [("node-a", "agent-new")]


def test_prefix_hit_rate_sums_the_engines_counters() -> None:
    real = (
        "# HELP kvmarina_engine_prompt_tokens_total Prompt tokens\n"
        "# TYPE kvmarina_engine_prompt_tokens_total counter\n"
        "kvmarina_engine_prompt_tokens_total 300.0\n"
        "kvmarina_engine_prompt_tokens_created 1.7e9\n"
        "kvmarina_engine_cached_prompt_tokens_total 240.0\n"
        'kvmarina_engine_requests_total{outcome="ok"} 3.0\n'
    )
    simulated = "kvmarina_sim_prompt_tokens_total 100\nkvmarina_sim_cached_tokens_total 0\n"
    assert st.prefix_hit_rate([real, simulated]) == 0.6
    assert st.prefix_hit_rate([]) is None
    assert st.prefix_hit_rate(["kvmarina_engine_prompt_tokens_total 0\n"]) is None
    assert st.prefix_hit_rate(["garbage line\nx y z\n"]) is None


def test_the_statuses_the_operator_writes_fit_the_crd_schemas() -> None:
    figures = st.pool_figures([sample()], PAGE)
    conds = [st.condition(c, False, "R", "m", 3) for c in st.CONDITION_TYPES]
    pool = st.with_gen(3, nodesReady=1, nodesDesired=1, servings=2, conditions=conds, **figures)
    validate_status("KVCachePool", st.diff({}, pool))
    serving = st.with_gen(
        3, replicas=2, readyReplicas=1, routerUrl="http://r", prefixHitRate=0.5, conditions=conds
    )
    validate_status("ModelServing", st.diff({}, serving))
    validate_status("ModelServing", st.invalid(4, "spec.replicas: bad"))
