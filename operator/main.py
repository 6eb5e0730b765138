"""``kvmarina operator``: run kopf with the handlers of ``kvmarina.operator.handlers``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from kvmarina.logs import LEVEL_ENV, add_log_format_option, log_level, setup_logging
from kvmarina.operator.metrics import DEFAULT_PORT, PORT_ENV, serve
from kvmarina.operator.settings import Settings

log = logging.getLogger("kvmarina.operator")


def parse_args(argv: list[str], env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Flags win over the environment the chart sets (``KVMARINA_LOG_LEVEL``,
    ``KVMARINA_LOG_FORMAT``, ``KVMARINA_METRICS_PORT``)."""
    e = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="kvmarina operator", description=__doc__.splitlines()[0])
    p.add_argument(
        "--log-level",
        type=log_level,
        default=e.get(LEVEL_ENV, "info"),
        help=f"debug, info, warning or error; default ${LEVEL_ENV} or info",
    )
    add_log_format_option(p, e)
    p.add_argument(
        "--metrics-port",
        type=int,
        default=e.get(PORT_ENV, str(DEFAULT_PORT)),
        help=f"port of the Prometheus /metrics endpoint, 0 for none; default ${PORT_ENV} "
        f"or {DEFAULT_PORT}",
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    from kvmarina.operator import handlers

    settings = handlers.SETTINGS
    if args.metrics_port:
        server = serve(args.metrics_port)
        log.info("metrics on http://0.0.0.0:%d/metrics", server.server_port)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz"
    asyncio.run(kopf.operator(liveness_endpoint=liveness, **scope_and_peering(settings)))
    return 0


def scope_and_peering(settings: Settings) -> dict[str, Any]:
    """What kopf watches, and whether it elects a leader: with a peering name (the chart
    sets one for 2+ replicas) kopf joins that peering object and pauses while a live
    peer of higher priority exists; without one it runs standalone. kopf looks for a
    ClusterKopfPeering when it watches the cluster, a KopfPeering per namespace
    otherwise (the chart creates whichever applies)."""
    namespaces = list(settings.watch_namespaces)
    return {
        "standalone": not settings.peering,
        "peering_name": settings.peering or None,
        "namespaces": namespaces,
        "clusterwide": not namespaces,
    }
