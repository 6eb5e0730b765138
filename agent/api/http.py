"""The agent's HTTP side: health, readiness, Prometheus metrics, stats, the event stream."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvmarina.agent.node.pool import Pool
from kvmarina.event_log import stream

log = logging.getLogger(__name__)


class PoolCollector(Collector):
    """Reads the pool at scrape time: no bookkeeping on the hot path."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self):  # type: ignore[no-untyped-def]
        p = self.pool
        pages = GaugeMetricFamily(
            "kvmarina_agent_pages", "Pages by tier and state", labels=["tier", "state"]
        )
        for tier, fp in (("device", p.device), ("host", p.host)):
            pages.add_metric([tier, "used"], fp.used)
            pages.add_metric([tier, "free"], fp.free)
        yield pages
        blocks = GaugeMetricFamily(
            "kvmarina_agent_blocks", "Indexed blocks by tier", labels=["tier"]
        )
        summary = p.summary()
        for tier, n in summary["blocks"].items():  # type: ignore[attr-defined]
            blocks.add_metric([tier], n)
        yield blocks
        s = p.stats
        for name, key, doc in (
            ("kvmarina_agent_lookups", "lookups", "Lookups served"),
            ("kvmarina_agent_hit_blocks", "hit_blocks", "Blocks found by lookups"),
            ("kvmarina_agent_miss_blocks", "miss_blocks", "Blocks asked for and not found"),
            ("kvmarina_agent_evictions", "evicted", "Blocks dropped from the node"),
            ("kvmarina_agent_offloads", "offloaded", "Blocks moved device -> host"),
            ("kvmarina_agent_promotions", "promoted", "Blocks moved host -> device"),
            ("kvmarina_agent_commits", "committed", "Blocks committed by engines"),
        ):
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))
        for name, key, doc in (
            ("kvmarina_agent_hit_tokens", "hit_blocks", "Prompt tokens found cached by lookups"),
            ("kvmarina_agent_miss_tokens", "miss_blocks", "Prompt tokens asked for, not cached"),
        ):
            yield CounterMetricFamily(name, doc, value=s.get(key, 0) * p.block_tokens)
        yield CounterMetricFamily(
            "kvmarina_agent_reclaim_requests",
            "Requests to release blocks sent to engines under pressure",
            value=s.get("reclaim_requests", 0),
        )
        leased = GaugeMetricFamily(
            "kvmarina_agent_serving_leased",
            "Blocks leased and not yet committed, per serving",
            labels=["namespace", "serving"],
        )
        per: dict[str, int] = {}
        for sess in p.sessions.values():
            per[sess.ident.key] = per.get(sess.ident.key, 0) + len(sess.leased)
        for key, n in per.items():
            leased.add_metric(key.split("/", 1), n)
        yield leased
        yield GaugeMetricFamily(
            "kvmarina_agent_scope_regions",
            "Shared regions (one per sharing scope)",
            value=len(p.regions),
        )
        usage = GaugeMetricFamily(
            "kvmarina_agent_serving_blocks",
            "Device blocks held per serving",
            labels=["namespace", "serving"],
        )
        for key, n in p.usage.items():
            usage.add_metric(key.split("/", 1), n)
        yield usage
        if "transfer" in p.extra_summary:
            t = p.extra_summary["transfer"]()
            moved = CounterMetricFamily(
                "kvmarina_agent_transfer_bytes", "Bytes pulled from each peer", labels=["peer"]
            )
            rate = GaugeMetricFamily(
                "kvmarina_agent_transfer_gbps",
                "Achieved pull bandwidth from each peer (GB/s, bytes over time spent pulling)",
                labels=["peer"],
            )
            for peer, st in t["peers"].items():
                moved.add_metric([peer], st["bytes"])
                rate.add_metric([peer], st["gbps"])
            yield moved
            yield rate
            yield CounterMetricFamily(
                "kvmarina_agent_transfer_corrupt",
                "Pulled blocks dropped on a checksum mismatch",
                value=t["corrupt"],
            )
        yield GaugeMetricFamily(
            "kvmarina_agent_sessions", "Registered engines", value=len(p.sessions)
        )
        yield GaugeMetricFamily(
            "kvmarina_agent_event_seq", "Last event sequence this boot", value=p.events.seq
        )
        yield GaugeMetricFamily(
            "kvmarina_agent_subscribers", "Event subscribers", value=len(p.events.subscribers)
        )
        yield GaugeMetricFamily(
            "kvmarina_agent_event_lag",
            "Events the slowest subscriber has not taken yet",
            value=p.events.lag(),
        )
        yield CounterMetricFamily(
            "kvmarina_agent_event_resyncs",
            "Snapshots re-sent to subscribers that fell behind",
            value=p.events.resyncs,
        )


def build_app(
    pool: Pool, ready: asyncio.Event, extra_stats: dict[str, object] | None = None
) -> web.Application:
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "boot_id": pool.events.boot_id})

    async def readyz(_: web.Request) -> web.Response:
        if ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), content_type="text/plain", charset="utf-8"
        )

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({**pool.summary(), **(extra_stats or {})})

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-kvmarina-frames"})
        await resp.prepare(request)
        await stream(pool.events, resp.write)
        return resp

    async def clear(request: web.Request) -> web.Response:
        # Dropping a node's cache is an operator's act: only from the node itself
        # (local mode, kubectl exec), never from across the pod network.
        if request.remote not in ("127.0.0.1", "::1"):
            return web.json_response(
                {"error": "/admin/clear is served on loopback only"}, status=403
            )
        return web.json_response({"dropped": pool.drop_unpinned()})

    app.router.add_post("/admin/clear", clear)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    app.router.add_get("/v1/events", events)
    return app
