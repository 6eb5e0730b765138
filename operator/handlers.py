"""The thin kopf layer: every event of either kind runs the same level-based reconcile.

``kopf run -m kvmarina.operator.handlers`` or ``kvmarina operator``. kopf keeps its
bookkeeping in annotations (so the status schemas stay strict) and holds our own
finalizer, which lets a pool refuse deletion while servings still use it.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kvmarina.operator.kube import KubeClient
from kvmarina.operator.reconcile import reconcile_pool, reconcile_serving, servings_of
from kvmarina.operator.settings import Settings
from kvmarina.specs import GROUP, VERSION

SETTINGS = Settings.from_env()
_client: KubeClient | None = None
POOLS = (GROUP, VERSION, "kvcachepools")
SERVINGS = (GROUP, VERSION, "modelservings")


def kube() -> KubeClient:
    global _client
    if _client is None:
        _client = KubeClient.from_env()
    return _client


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "kvmarina.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvmarina.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvmarina.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    global _client
    if _client is not None:
        await _client.close()
        _client = None


@kopf.on.resume(*POOLS)
@kopf.on.create(*POOLS)
@kopf.on.update(*POOLS)
@kopf.timer(*POOLS, interval=SETTINGS.resync_seconds, idle=5)
async def pool_changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status.update(await reconcile_pool(kube(), SETTINGS, dict(body)))


@kopf.on.delete(*POOLS)
async def pool_deleted(name: str, patch: kopf.Patch, **_: Any) -> None:
    users = [
        f"{s['metadata'].get('namespace')}/{s['metadata']['name']}"
        for s in await servings_of(kube(), name)
    ]
    if users:
        message = f"still used by ModelServing {', '.join(sorted(users))}; delete those first"
        patch.status["conditions"] = [
            {"type": "Ready", "status": "False", "reason": "InUse", "message": message}
        ]
        raise kopf.TemporaryError(message, delay=10)


@kopf.on.resume(*SERVINGS)
@kopf.on.create(*SERVINGS)
@kopf.on.update(*SERVINGS)
@kopf.timer(*SERVINGS, interval=SETTINGS.resync_seconds, idle=5)
async def serving_changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status.update(await reconcile_serving(kube(), SETTINGS, dict(body)))
