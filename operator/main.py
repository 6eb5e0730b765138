"""``kvmarina operator``: run kopf with the handlers of ``kvmarina.operator.handlers``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import kopf

from kvmarina.operator.settings import Settings


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvmarina operator", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kvmarina.operator import handlers

    settings = handlers.SETTINGS
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
