"""Level-based reconciliation: read the world, plan, apply what differs, report status.

Called by the kopf layer on create, update, resume and a timer alike; it never
looks at what changed, only at what is, so a child edited or deleted by hand is
restored on the next pass and a restart creates no duplicates.
"""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime
from typing import Any

from kvmarina.operator import naming as n
from kvmarina.operator.components import (
    AGENT_HTTP_PORT,
    ENGINE_PORT,
    Endpoint,
    PlanError,
    effective_scope,
    new_token,
)
from kvmarina.operator.kube import KubeClient
from kvmarina.operator.plan_pool import plan_pool
from kvmarina.operator.plan_serving import plan_serving
from kvmarina.operator.settings import Settings
from kvmarina.specs import API_VERSION
from kvmarina.validate import Resource, SpecError, parse_resource

log = logging.getLogger(__name__)
ROTATE = "kvmarina.io/rotate-credentials"


def contains(live: Any, want: Any) -> bool:
    """``want`` is a sub-document of ``live`` (what apply would not change)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and contains(live[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(contains(a, b) for a, b in zip(live, want, strict=True))
        )
    return bool(live == want)


def _comparable(obj: dict[str, Any]) -> dict[str, Any]:
    if obj.get("kind") == "Secret" and "stringData" in obj:
        obj = dict(obj)
        obj["data"] = {
            k: base64.b64encode(v.encode()).decode() for k, v in obj.pop("stringData").items()
        }
    return obj


async def apply_all(kube: KubeClient, manifests: list[dict[str, Any]]) -> int:
    """Apply the manifests that differ from the live objects; the number applied."""
    changed = 0
    for m in manifests:
        meta = m["metadata"]
        live = await kube.get(m["apiVersion"], m["kind"], meta.get("namespace"), meta["name"])
        if live is not None and contains(live, _comparable(m)):
            continue
        await kube.apply(m)
        changed += 1
    return changed


def condition(ctype: str, ok: bool, reason: str, message: str, gen: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": ctype,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if gen is not None:
        cond["observedGeneration"] = gen
    return cond


def _spec_only(body: dict[str, Any]) -> dict[str, Any]:
    """The user's part of the object: status is ours and is not validated as input."""
    return {k: v for k, v in body.items() if k != "status"}


def invalid_status(gen: int | None, message: str) -> dict[str, Any]:
    return {
        **_gen(gen),
        "conditions": [
            condition("InvalidSpec", True, "InvalidSpec", message, gen),
            condition("Ready", False, "InvalidSpec", message, gen),
        ],
    }


async def _secret_value(
    kube: KubeClient, ns: str, name: str, key: str
) -> tuple[str | None, dict[str, Any] | None]:
    live = await kube.get("v1", "Secret", ns, name)
    if live is None:
        return None, None
    raw = (live.get("data") or {}).get(key)
    if raw is None:
        raw_str = (live.get("stringData") or {}).get(key)  # emulators keep stringData
        return raw_str, live
    return base64.b64decode(raw).decode(), live


async def servings_of(kube: KubeClient, pool: str) -> list[dict[str, Any]]:
    items = await kube.list(API_VERSION, "ModelServing", None)
    return [i for i in items if (i.get("spec") or {}).get("poolRef", {}).get("name") == pool]


async def reconcile_pool(
    kube: KubeClient, settings: Settings, body: dict[str, Any]
) -> dict[str, Any]:
    meta = body["metadata"]
    gen = meta.get("generation")
    try:
        pool = parse_resource(_spec_only(body), f"KVCachePool/{meta['name']}")
    except SpecError as exc:
        return invalid_status(gen, "; ".join(map(str, exc.issues)))
    token, live = await _secret_value(
        kube, settings.namespace, n.pool_secret_name(pool.name), "token"
    )
    rotate = (meta.get("annotations") or {}).get(ROTATE)
    seen = ((live or {}).get("metadata", {}).get("annotations") or {}).get(ROTATE)
    if token is None or (rotate and rotate != seen):
        token = new_token()
    creds = await _credentials(kube, pool)
    manifests = plan_pool(pool, meta.get("uid", ""), settings, token, creds)
    for m in manifests:
        if (
            m["kind"] == "Secret"
            and m["metadata"]["name"] == n.pool_secret_name(pool.name)
            and rotate
        ):
            m["metadata"]["annotations"] = {ROTATE: rotate}
    changed = await apply_all(kube, manifests)
    agents = await kube.list(
        "v1", "Pod", settings.namespace, n.selector("agent", n.pool_instance(pool.name))
    )
    ready = sum(1 for p in agents if _pod_ready(p))
    ds = await kube.get("apps/v1", "DaemonSet", settings.namespace, n.agent_name(pool.name))
    desired = int(((ds or {}).get("status") or {}).get("desiredNumberScheduled", len(agents)))
    ok = desired > 0 and ready == desired
    msg = f"{ready}/{desired} agents ready" + (f"; {changed} objects updated" if changed else "")
    return {
        **_gen(gen),
        "nodesReady": ready,
        "nodesDesired": desired,
        "conditions": [
            condition("Ready", ok, "AgentsReady" if ok else "AgentsStarting", msg, gen),
            condition("Progressing", not ok, "Reconciled", msg, gen),
            condition("InvalidSpec", False, "Valid", "", gen),
        ],
    }


async def _credentials(kube: KubeClient, pool: Resource) -> list[tuple[str, str, str, str]]:
    out = []
    for item in await servings_of(kube, pool.name):
        try:
            s = parse_resource(_spec_only(item))
            scope = effective_scope(s.spec, pool.spec)
        except (SpecError, PlanError):
            continue
        ns = s.namespace or "default"
        token, _ = await _secret_value(kube, ns, n.serving_token_name(s.name), "token")
        if token:
            out.append((s.name, ns, scope, token))
    return out


def _gen(gen: int | None) -> dict[str, Any]:
    return {"observedGeneration": gen} if gen is not None else {}


def _pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


async def reconcile_serving(
    kube: KubeClient, settings: Settings, body: dict[str, Any]
) -> dict[str, Any]:
    meta = body["metadata"]
    gen = meta.get("generation")
    try:
        serving = parse_resource(_spec_only(body), f"ModelServing/{meta['name']}")
    except SpecError as exc:
        return invalid_status(gen, "; ".join(map(str, exc.issues)))
    pool_body = await kube.get(API_VERSION, "KVCachePool", None, serving.spec.pool_ref.name)
    if pool_body is None:
        return invalid_status(
            gen,
            f"spec.poolRef.name: KVCachePool {serving.spec.pool_ref.name!r} "
            "does not exist; create it or fix the name",
        )
    try:
        pool = parse_resource(_spec_only(pool_body))
        effective_scope(serving.spec, pool.spec)
    except (SpecError, PlanError) as exc:
        return invalid_status(gen, str(exc))
    if serving.spec.budget.max_bytes > pool.spec.memory.device_bytes:
        return invalid_status(
            gen,
            f"spec.budget.max {serving.spec.budget.max} exceeds the pool's "
            f"device memory per node ({pool.spec.memory.device}); lower it",
        )
    ns = serving.namespace or "default"
    token, _ = await _secret_value(kube, ns, n.serving_token_name(serving.name), "token")
    endpoints = await _endpoints(kube, settings, serving, pool)
    manifests = plan_serving(
        serving, meta.get("uid", ""), pool, settings, token or new_token(), endpoints
    )
    changed = await apply_all(kube, manifests)
    if token is None:  # a new serving: the pool's agents must learn its credential
        creds = await _credentials(kube, pool)
        pool_uid = pool_body["metadata"].get("uid", "")
        plan = plan_pool(pool, pool_uid, settings, "unused", creds)
        await apply_all(
            kube, [m for m in plan if m["metadata"]["name"] == n.pool_credentials_name(pool.name)]
        )
    dep = await kube.get("apps/v1", "Deployment", ns, n.engine_name(serving.name))
    ready = int(((dep or {}).get("status") or {}).get("readyReplicas", 0) or 0)
    ok = ready >= serving.spec.replicas and serving.spec.replicas > 0
    msg = f"{ready}/{serving.spec.replicas} engines ready" + (
        f"; {changed} objects updated" if changed else ""
    )
    return {
        **_gen(gen),
        "replicas": serving.spec.replicas,
        "readyReplicas": ready,
        "selector": ",".join(f"{k}={v}" for k, v in n.selector("engine", serving.name).items()),
        "routerUrl": f"http://{n.router_name(serving.name)}.{ns}.svc.{settings.cluster_domain}",
        "conditions": [
            condition("Ready", ok, "EnginesReady" if ok else "EnginesStarting", msg, gen),
            condition("Progressing", not ok, "Reconciled", msg, gen),
            condition("InvalidSpec", False, "Valid", "", gen),
        ],
    }


async def _endpoints(
    kube: KubeClient, settings: Settings, serving: Resource, pool: Resource
) -> list[Endpoint]:
    pods = await kube.list(
        "v1", "Pod", serving.namespace or "default", n.selector("engine", serving.name)
    )
    agents = await kube.list(
        "v1", "Pod", settings.namespace, n.selector("agent", n.pool_instance(pool.name))
    )
    agent_by_node = {
        (a.get("spec") or {}).get("nodeName"): (a.get("status") or {}).get("podIP") for a in agents
    }
    out = []
    for p in pods:
        ip, node = (p.get("status") or {}).get("podIP"), (p.get("spec") or {}).get("nodeName")
        if not ip or not node or not _pod_ready(p):
            continue
        agent_ip = agent_by_node.get(node)
        out.append(
            Endpoint(
                p["metadata"]["name"],
                f"http://{ip}:{ENGINE_PORT}",
                node,
                f"http://{agent_ip}:{AGENT_HTTP_PORT}" if agent_ip else None,
            )
        )
    return sorted(out, key=lambda e: e.name)
