"""``kvmarina operator``: run kopf with the handlers of ``kvmarina.operator.handlers``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf


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
    namespaces = list(settings.watch_namespaces)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz"
    asyncio.run(
        kopf.operator(
            standalone=not settings.peering,
            peering_name=settings.peering or None,
            namespaces=namespaces,
            clusterwide=not namespaces,
            liveness_endpoint=liveness,
        )
    )
    return 0
