"""The thin kopf layer: every event of either kind runs the same level-based reconcile.

``kopf run -m kvmarina.operator.handlers`` or ``kvmarina operator``. kopf keeps its
bookkeeping in annotations (so the status schemas stay strict) and holds our own
finalizer, which lets a pool refuse deletion while servings still use it and lets
a deleted serving withdraw its credential from the pool's agents. Status is
patched only where it differs from the live one.

Only the timer reads the pods' own figures (agents' ``/stats``, engines'
``/metrics``): a change is answered without waiting on pods, and the figures are
refreshed once per resync interval whatever happens.

Every call into the Reconciler goes through ``METRICS.track``, which counts and times
it (``kvmarina.operator.metrics``).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import kopf

from kvmarina.operator import status as st
from kvmarina.operator.kube import KubeClient
from kvmarina.operator.metrics import METRICS
from kvmarina.operator.reconcile import Reconciler
from kvmarina.operator.settings import Settings
from kvmarina.specs import GROUP, VERSION

SETTINGS = Settings.from_env()
_reconciler: Reconciler | None = None
POOLS = (GROUP, VERSION, "kvcachepools")
SERVINGS = (GROUP, VERSION, "modelservings")
FINALIZER = "kvmarina.io/finalizer"
POOL, SERVING = "KVCachePool", "ModelServing"
# An API error retries soon (kopf's default waits 60 s); the next pass is level-based.
RETRY = min(5.0, max(0.5, SETTINGS.resync_seconds / 4))
IDLE = SETTINGS.resync_seconds / 4  # a timer waits for an object to stop changing


def first_resync(uid: str | None = None, **_: Any) -> float:
    """When an object's timer first runs: a full interval after its change handlers
    (which have just reconciled it), plus up to one more interval picked by its uid,
    so that objects created together do not all resync in the same second."""
    spread = int.from_bytes(hashlib.blake2b(str(uid).encode(), digest_size=2).digest()) / 65536
    return SETTINGS.resync_seconds * (1.0 + spread)


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        _reconciler = Reconciler(KubeClient.from_env(), SETTINGS)
    return _reconciler


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvmarina.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvmarina.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # On deletion kopf waits for the object's running timer pass to end; by default it
    # re-checks only every 60 s, which would hold a deleted object that long.
    settings.background.cancellation_polling = 1.0


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    global _reconciler
    if _reconciler is not None:
        await _reconciler.close()
        _reconciler = None
    METRICS.forget_all()  # a stopped operator no longer knows the pods


def _patch_status(body: kopf.Body, patch: kopf.Patch, want: dict[str, Any]) -> None:
    patch.status.update(st.diff(dict(body.get("status") or {}), want))


def _serving_ref(body: kopf.Body) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


@kopf.on.resume(*POOLS, backoff=RETRY)
@kopf.on.create(*POOLS, backoff=RETRY)
@kopf.on.update(*POOLS, backoff=RETRY)
async def pool_changed(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    want = await METRICS.track(POOL, name, lambda: reconciler().pool(dict(body)))
    _patch_status(body, patch, want)


@kopf.timer(
    *POOLS,
    interval=SETTINGS.resync_seconds,
    initial_delay=first_resync,
    idle=IDLE,
    backoff=RETRY,
)
async def pool_resync(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    want = await METRICS.track(POOL, name, lambda: reconciler().pool(dict(body), observe=True))
    _patch_status(body, patch, want)


@kopf.on.delete(*POOLS)
async def pool_deleted(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    why = await METRICS.track(POOL, name, lambda: reconciler().pool_deleted(name))
    if not why:
        METRICS.forget(POOL, name)
        return
    live = dict(body.get("status") or {})
    conds = [c for c in live.get("conditions") or [] if c.get("type") != "Ready"]
    conds.append(st.condition("Ready", False, "InUse", why, None))
    _patch_status(body, patch, {**live, "conditions": conds})
    raise kopf.TemporaryError(why, delay=max(1.0, SETTINGS.resync_seconds / 6))


@kopf.on.resume(*SERVINGS, backoff=RETRY)
@kopf.on.create(*SERVINGS, backoff=RETRY)
@kopf.on.update(*SERVINGS, backoff=RETRY)
async def serving_changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    want = await METRICS.track(
        SERVING, _serving_ref(body), lambda: reconciler().serving(dict(body))
    )
    _patch_status(body, patch, want)


@kopf.timer(
    *SERVINGS,
    interval=SETTINGS.resync_seconds,
    initial_delay=first_resync,
    idle=IDLE,
    backoff=RETRY,
)
async def serving_resync(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    want = await METRICS.track(
        SERVING, _serving_ref(body), lambda: reconciler().serving(dict(body), observe=True)
    )
    _patch_status(body, patch, want)


@kopf.on.delete(*SERVINGS, backoff=RETRY)
async def serving_deleted(body: kopf.Body, **_: Any) -> None:
    ref = _serving_ref(body)
    await METRICS.track(SERVING, ref, lambda: reconciler().serving_deleted(dict(body)))
    METRICS.forget(SERVING, ref)


# An engine or agent pod that becomes ready (or stops being ready, or moves) changes the
# router's endpoints: reconcile the servings concerned now, not at the next resync.
_pod_state: dict[str, tuple[bool, str | None]] = {}
PODS = {"app.kubernetes.io/part-of": "kvmarina"}


@kopf.on.event("", "v1", "pods", labels=PODS)
async def pod_event(body: kopf.Body, type: str | None, namespace: str | None, **_: Any) -> None:
    meta, uid = body.get("metadata") or {}, str((body.get("metadata") or {}).get("uid"))
    labels = meta.get("labels") or {}
    state = (st.pod_ready(dict(body)), (body.get("status") or {}).get("podIP"))
    if type == "DELETED":
        state = (False, None)
    if _pod_state.get(uid) == state:
        return
    _pod_state[uid] = state
    if type == "DELETED":
        _pod_state.pop(uid, None)
    component = labels.get("app.kubernetes.io/component")
    instance = labels.get("app.kubernetes.io/instance", "")
    if component == "engine":
        await METRICS.track(
            SERVING,
            f"{namespace}/{instance}",
            lambda: reconciler().serving_pods_changed(namespace, instance),
        )
    elif component == "agent" and instance.startswith("pool-"):
        # the pool's servings are what this pass reconciles (their routers name the agents)
        pool = instance.removeprefix("pool-")
        await METRICS.track(SERVING, pool, lambda: reconciler().pool_pods_changed(pool))
