"""Status documents and conditions (metav1.Condition semantics).

``lastTransitionTime`` changes only when a condition's status flips, and a status
identical to the live one produces no patch: a periodic reconcile of a settled
object writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kvmarina.agent_stats import AgentStats

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "InvalidSpec")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(ctype: str, ok: bool, reason: str, message: str, gen: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": ctype,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }
    if gen is not None:
        cond["observedGeneration"] = gen
    return cond


def with_gen(gen: int | None, **fields: Any) -> dict[str, Any]:
    out = {"observedGeneration": gen} if gen is not None else {}
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


def stamp(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``new`` with each condition's transition time carried over from ``old`` when its
    status did not change, and set to now when it did (or it is new)."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"]
        t = prev.get("lastTransitionTime") if same and prev else None
        out.append({**c, "lastTransitionTime": t or now()})
    return out


def diff(live: dict[str, Any] | None, want: dict[str, Any]) -> dict[str, Any]:
    """The status patch that turns ``live`` into ``want`` (empty when nothing changed).
    Keys ``live`` has and ``want`` lacks are cleared with ``None`` (merge-patch)."""
    live = live or {}
    want = {**want, "conditions": stamp(live.get("conditions"), want.get("conditions", []))}
    patch = {k: v for k, v in want.items() if live.get(k) != v}
    patch.update({k: None for k in live if k not in want and live[k] is not None})
    return patch


def invalid(gen: int | None, message: str) -> dict[str, Any]:
    return with_gen(
        gen,
        conditions=[
            condition("Ready", False, "InvalidSpec", message, gen),
            condition("Progressing", False, "InvalidSpec", message, gen),
            condition("Degraded", False, "InvalidSpec", "", gen),
            condition("InvalidSpec", True, "InvalidSpec", message, gen),
        ],
    )


# ------------------------------------------------------------ figures from the pods

UNREACHABLE, NO_IP, NOT_READY, BAD_STATS = "Unreachable", "NoPodIP", "PodNotReady", "BadStats"
# Engines' prompt-token counters (reference, simulated, vLLM): (cached, all).
ENGINE_COUNTERS = (
    ("kvmarina_engine_cached_prompt_tokens_total", "kvmarina_engine_prompt_tokens_total"),
    ("kvmarina_sim_cached_tokens_total", "kvmarina_sim_prompt_tokens_total"),
    ("vllm:prompt_tokens_cached_total", "vllm:prompt_tokens_total"),
)


@dataclass(frozen=True, slots=True)
class AgentSample:
    """What the operator learnt about one agent pod in one pass: the pod's own state,
    and either the agent's ``/stats`` JSON text or why it could not be read."""

    node: str
    pod: str
    pod_ready: bool
    url: str | None  # None: the pod has no IP yet
    body: str | None = None
    error: str | None = None


def rate(hits: int, total: int) -> float | None:
    """``hits / total`` rounded to 4 places (status stays readable); ``None`` when
    nothing was asked yet."""
    return round(hits / total, 4) if total > 0 else None


def agent_figures(stats: Any, page_bytes: int) -> tuple[dict[str, Any], int, int]:
    """An agent's ``/stats`` document (``kvmarina.agent_stats``) as status fields, plus
    its raw (hit, asked) block counts for the pool-wide hit rate.

    Byte figures are pages times the pool's page size (the agent counts pages).
    ``eventLag``, ``resyncs`` and ``subscribers`` are filled when the agent reports
    them; older agents leave them empty. ``StatsError`` (a ``ValueError``) names the
    first figure that is missing or not a count."""
    doc = AgentStats.from_wire(stats)
    tiers = {
        tier: {
            "capacityBytes": doc.pages[tier].total * page_bytes,
            "usedBytes": doc.pages[tier].used * page_bytes,
            "blocks": doc.blocks[tier],
        }
        for tier in ("device", "host")
    }
    index = {
        "bootId": doc.boot_id or None,
        "lastEventSeq": doc.seq,
        "eventLag": doc.event_lag,
        "resyncs": doc.resyncs,
        "subscribers": doc.subscribers,
    }
    fields = {
        **tiers,
        "blocks": doc.blocks["device"] + doc.blocks["host"],
        "hitRate": rate(doc.hit_blocks, doc.asked_blocks),
        "sessions": doc.sessions,
        "index": {k: v for k, v in index.items() if v is not None},
    }
    return fields, doc.hit_blocks, doc.asked_blocks


def agent_entry(sample: AgentSample, page_bytes: int) -> tuple[dict[str, Any], int, int]:
    """One ``status.nodes`` entry and its raw (hit, asked) counts. Invariant: an entry
    is ``ready`` only when the pod is Ready *and* its ``/stats`` was read and made
    sense; otherwise ``reason`` and ``message`` say what is wrong."""
    base: dict[str, Any] = {"node": sample.node, "pod": sample.pod, "ready": False}
    if sample.url is None:
        msg = "the agent pod has no IP yet (not scheduled or starting)"
        return {**base, "reason": NO_IP, "message": msg}, 0, 0
    if sample.body is None:
        msg = f"GET {sample.url}: {sample.error or 'no answer'}"
        return {**base, "reason": UNREACHABLE, "message": msg}, 0, 0
    try:
        fields, hits, asked = agent_figures(json.loads(sample.body), page_bytes)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return {**base, "reason": BAD_STATS, "message": f"{sample.url}: {exc}"[:300]}, 0, 0
    entry = {**base, **fields, "ready": sample.pod_ready}
    if not sample.pod_ready:
        entry.update(reason=NOT_READY, message="the agent answers but its pod is not Ready")
    return entry, hits, asked


def _rank(entry: dict[str, Any]) -> int:
    """Which of two pods on one node speaks for it: a ready agent, then one that
    answered, then any (a DaemonSet rollout briefly has an old pod beside the new)."""
    return 0 if entry["ready"] else 1 if "index" in entry else 2


def pool_figures(samples: list[AgentSample], page_bytes: int) -> dict[str, Any]:
    """``nodes`` (one entry per node, sorted), pool-wide ``blocks`` and ``hitRate``
    (over the agents that answered; ``None`` until one was asked for blocks).
    Invariant: node names are unique (``status.nodes`` is a list-map keyed by node)."""
    best: dict[str, tuple[dict[str, Any], int, int]] = {}
    for s in sorted(samples, key=lambda s: s.pod):
        got = agent_entry(s, page_bytes)
        if s.node not in best or _rank(got[0]) < _rank(best[s.node][0]):
            best[s.node] = got
    entries = [best[node][0] for node in sorted(best)]
    hits = sum(h for _, h, _ in best.values())
    asked = sum(a for _, _, a in best.values())
    return {
        "nodes": entries,
        "blocks": sum(int(e.get("blocks", 0)) for e in entries),
        "hitRate": rate(hits, asked),
    }


def unhealthy_agents(nodes: list[dict[str, Any]]) -> str:
    """A Degraded message for agents whose pods are Ready but whose /stats failed."""
    bad = [n for n in nodes if n.get("reason") in (UNREACHABLE, BAD_STATS)]
    return "; ".join(f"agent on node {n['node']}: {n['reason']} ({n['message']})" for n in bad)


def prometheus_counters(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition summed per metric name (the series of a
    labelled metric, e.g. vLLM's per-engine counters, add up); comments and lines that
    do not parse are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if rest:
            rest = rest.rsplit("}", 1)[-1]
        else:
            name, _, rest = line.partition(" ")
        parts = rest.split()
        if not name or not parts:
            continue
        try:
            out[name.strip()] = out.get(name.strip(), 0.0) + float(parts[0])
        except ValueError:
            continue
    return out


def event_streams(health: str | None) -> list[dict[str, Any]]:
    """The router's ``/health`` JSON -> ``status.eventStreams`` (vLLM pods only)."""
    try:
        doc = json.loads(health) if health else {}
    except json.JSONDecodeError:
        return []
    pods = doc.get("pods") if isinstance(doc, dict) else None
    out = []
    for name, pod in sorted((pods or {}).items()):
        ev = pod.get("kv_events") if isinstance(pod, dict) else None
        if not isinstance(ev, dict):
            continue
        out.append(
            {
                "pod": name,
                "connected": bool(ev.get("connected")),
                "live": bool(ev.get("live")),
                "lastSeq": ev.get("last_seq"),
                "gaps": int(ev.get("gaps") or 0),
                "resyncs": int(ev.get("resyncs") or 0),
                "lagSeconds": ev.get("lag_s"),
                "errors": {k: int(v) for k, v in (ev.get("errors") or {}).items()},
            }
        )
    return out


def stale_streams(streams: list[dict[str, Any]]) -> str:
    """A Degraded message for engines the router cannot follow by their events."""
    bad = [s for s in streams if not s["live"]]
    return "; ".join(
        f"engine pod {s['pod']}: KV events "
        + (", ".join(sorted(s["errors"])) or ("not connected" if not s["connected"] else "stale"))
        + "; the router routes it from its own record"
        for s in bad
    )


def prefix_hit_rate(metrics: list[str]) -> float | None:
    """Prompt tokens served from the KV cache over all prompt tokens, summed over the
    engines' ``/metrics`` texts; ``None`` before any prompt was seen."""
    cached = total = 0.0
    for text in metrics:
        values = prometheus_counters(text)
        for hit_name, all_name in ENGINE_COUNTERS:
            if all_name in values:
                cached += values.get(hit_name, 0.0)
                total += values[all_name]
                break
    return round(min(cached / total, 1.0), 4) if total > 0 else None


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
