"""Level-based reconciliation: read the world, plan, apply what differs, report status.

Called by the kopf layer on create, update, resume and a timer alike; it never
looks at what changed, only at what is, so a child edited or deleted by hand is
restored on the next pass and a restart creates no duplicates. Planning is pure
(``plan_pool``, ``plan_serving``), applying is ``apply``, reading what the children
report is ``observe``. Each function returns the *desired* status; the kopf layer
patches the difference (``status.diff``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from kvmarina.operator import naming as n
from kvmarina.operator import status as st
from kvmarina.operator.apply import Applier, Key, key_of
from kvmarina.operator.components import PlanError, new_token
from kvmarina.operator.kube import KubeClient
from kvmarina.operator.observe import Observer
from kvmarina.operator.pki import PKIError, make_pool_pki
from kvmarina.operator.plan_pool import b64, credential_entry, credential_key, plan_pool, unb64
from kvmarina.operator.plan_serving import plan_serving
from kvmarina.operator.scrape import Scraper
from kvmarina.operator.settings import Settings
from kvmarina.serving import check_serving, effective_scope, overcommitted
from kvmarina.specs import API_VERSION
from kvmarina.validate import Resource, SpecError, parse_resource

log = logging.getLogger(__name__)
ROTATE = "kvmarina.io/rotate-credentials"
PKI_FILES = ("ca.crt", "tls.crt", "tls.key")


def _spec_only(body: dict[str, Any]) -> dict[str, Any]:
    """The user's part of the object: status is ours and is not validated as input."""
    return {k: v for k, v in body.items() if k != "status"}


def _carried(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Figures a pass that does not read the pods keeps from the live status (only
    the timer refreshes them, so change handlers neither wait on pods nor drop them)."""
    live = body.get("status") or {}
    return {k: live.get(k) for k in keys}


POOL_FIGURES = ("nodes", "blocks", "hitRate")
SERVING_FIGURES = ("prefixHitRate", "eventStreams")


@dataclass
class Reconciler:
    """Reconciles both kinds through one API client: plans (pure), applies what differs
    (``apply.Applier``), reads what the children report (``observe.Observer``)."""

    kube: KubeClient
    settings: Settings
    # kopf runs a timer beside an object's change handlers: one pass at a time per object
    locks: defaultdict[Key, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    scrape: Scraper = field(default_factory=Scraper)
    applier: Applier = field(init=False)
    observe: Observer = field(init=False)

    def __post_init__(self) -> None:
        self.applier = Applier(self.kube)
        self.observe = Observer(self.kube, self.settings, self.scrape)

    async def close(self) -> None:
        await self.kube.close()
        await self.scrape.close()

    async def servings_of(self, pool: str) -> list[dict[str, Any]]:
        items = await self.kube.list(API_VERSION, "ModelServing", None)
        return [i for i in items if (i.get("spec") or {}).get("poolRef", {}).get("name") == pool]

    # ------------------------------------------------------------------ pool

    async def _transfer(self, pool: Resource, rotate: str | None) -> tuple[dict[str, Any], str]:
        """The transfer Secret's files (kept; made when missing or rotated) and a
        problem message ('' when none)."""
        ns, name = self.settings.namespace, n.pool_secret_name(pool.name)
        live = await self.kube.get("v1", "Secret", ns, name)
        files = unb64((live or {}).get("data"))
        seen = ((live or {}).get("metadata", {}).get("annotations") or {}).get(ROTATE)
        if rotate and rotate != seen:
            files = {}
        problem = ""
        if "token" not in files:
            files["token"] = new_token()
        if pool.spec.migration.auth == "mtls" and not all(f in files for f in PKI_FILES):
            try:
                files.update(await make_pool_pki(pool.name))
            except PKIError as exc:
                problem = str(exc)
        return {"files": files, "live": live}, problem

    async def pool(self, body: dict[str, Any], observe: bool = False) -> dict[str, Any]:
        """The pool's desired status; ``observe``: also read every agent's ``/stats``
        (the timer's passes), else the live status's figures are kept."""
        async with self.locks[("KVCachePool", None, body["metadata"]["name"])]:
            return await self._pool(body, observe)

    async def _pool(self, body: dict[str, Any], observe: bool) -> dict[str, Any]:
        meta = body["metadata"]
        gen = meta.get("generation")
        try:
            pool = parse_resource(_spec_only(body), f"KVCachePool/{meta['name']}")
        except SpecError as exc:
            return st.invalid(gen, "; ".join(map(str, exc.issues)))
        ns = self.settings.namespace
        rotate = (meta.get("annotations") or {}).get(ROTATE)
        transfer, problem = await self._transfer(pool, rotate)
        manifests = plan_pool(pool, meta.get("uid", ""), self.settings, transfer["files"])
        secret_key = ("Secret", ns, n.pool_secret_name(pool.name))
        for m in manifests:
            if key_of(m) == secret_key and rotate:
                m["metadata"]["annotations"] = {ROTATE: rotate}
        changed, live = await self.applier.apply_all(manifests, {secret_key: transfer["live"]})
        await self.applier.prune(
            [("networking.k8s.io/v1", "NetworkPolicy", ns, n.agent_name(pool.name))],
            {key_of(m) for m in manifests},
        )
        users = await self.servings_of(pool.name)
        creds = live.get(("Secret", ns, n.pool_credentials_name(pool.name)))
        await self._forget_stale(pool.name, creds, users)
        agents = await self.kube.list(
            "v1", "Pod", ns, n.selector("agent", n.pool_instance(pool.name))
        )
        ready = sum(1 for p in agents if st.pod_ready(p))
        figures = (
            await self.observe.agents(pool, agents) if observe else _carried(body, POOL_FIGURES)
        )
        ds = live.get(("DaemonSet", ns, n.agent_name(pool.name))) or {}
        desired = int((ds.get("status") or {}).get("desiredNumberScheduled", len(agents)))
        ok = desired > 0 and ready == desired
        msg = f"{ready}/{desired} agents ready"
        minimums: dict[str, int] = {}
        for u in users:
            try:
                minimums[u["metadata"]["name"]] = parse_resource(
                    _spec_only(u)
                ).spec.budget.min_bytes
            except SpecError:
                continue
        unhealthy = st.unhealthy_agents(figures.get("nodes") or [])
        problem = "; ".join(
            p for p in (problem, overcommitted(pool.spec, minimums), unhealthy) if p
        )
        if changed:
            log.info("pool %s: %d object(s) applied", pool.name, changed)
        return st.with_gen(
            gen,
            nodesReady=ready,
            nodesDesired=desired,
            nodes=figures.get("nodes") or None,
            blocks=figures.get("blocks"),
            hitRate=figures.get("hitRate"),
            servings=len(users),
            conditions=[
                st.condition("Ready", ok, "AgentsReady" if ok else "AgentsStarting", msg, gen),
                st.condition("Progressing", not ok, "Rollout" if not ok else "Settled", msg, gen),
                st.condition(
                    "Degraded", bool(problem), "Problem" if problem else "None", problem, gen
                ),
                st.condition("InvalidSpec", False, "Valid", "", gen),
            ],
        )

    async def _forget_stale(
        self, pool: str, creds: dict[str, Any] | None, users: list[dict[str, Any]]
    ) -> None:
        """Remove credentials of servings that no longer use the pool (deleted while
        the operator was down, or moved to another pool)."""
        if creds is None:
            return
        wanted = {
            credential_key(u["metadata"]["name"], u["metadata"].get("namespace") or "default")
            for u in users
        }
        stale = [k for k in (creds.get("data") or {}) if k not in wanted]
        if stale:
            await self.kube.merge_patch(
                "v1", "Secret", self.settings.namespace, n.pool_credentials_name(pool),
                {"data": dict.fromkeys(stale)},
            )  # fmt: skip

    async def pool_deleted(self, name: str) -> str | None:
        """Why the pool cannot go yet (servings still use it), or ``None``."""
        users = sorted(
            f"{s['metadata'].get('namespace')}/{s['metadata']['name']}"
            for s in await self.servings_of(name)
        )
        if users:
            return f"still used by ModelServing {', '.join(users)}; delete those first"
        return None

    # --------------------------------------------------------------- serving

    async def serving(self, body: dict[str, Any], observe: bool = False) -> dict[str, Any]:
        """The serving's desired status; ``observe``: also read the ready engines'
        ``/metrics`` for the prefix hit rate, else the live status's is kept."""
        meta = body["metadata"]
        async with self.locks[("ModelServing", meta.get("namespace"), meta["name"])]:
            return await self._serving(body, observe)

    async def _serving(self, body: dict[str, Any], observe: bool) -> dict[str, Any]:
        meta = body["metadata"]
        gen = meta.get("generation")
        try:
            serving = parse_resource(_spec_only(body), f"ModelServing/{meta['name']}")
        except SpecError as exc:
            return st.invalid(gen, "; ".join(map(str, exc.issues)))
        pool_name = serving.spec.pool_ref.name
        pool_body = await self.kube.get(API_VERSION, "KVCachePool", None, pool_name)
        if pool_body is None:
            return st.invalid(
                gen,
                f"spec.poolRef.name: KVCachePool {pool_name!r} does not exist; "
                "create it or fix the name",
            )
        try:
            pool = parse_resource(_spec_only(pool_body))
        except SpecError:
            return st.invalid(gen, f"KVCachePool {pool_name!r} is itself invalid; see its status")
        problems = check_serving(serving.spec, pool_name, pool.spec)
        if problems:
            return st.invalid(gen, "; ".join(problems))
        ns = serving.namespace or "default"
        token_key = ("Secret", ns, n.serving_token_name(serving.name))
        token_live = await self.kube.get("v1", "Secret", ns, token_key[2])
        token = unb64((token_live or {}).get("data")).get("token") or new_token()
        engines = await self.kube.list("v1", "Pod", ns, n.selector("engine", serving.name))
        endpoints = await self.observe.endpoints(pool, engines, serving)
        try:
            manifests = plan_serving(
                serving, meta.get("uid", ""), pool, self.settings, token, endpoints
            )
        except PlanError as exc:
            return st.invalid(gen, str(exc))
        # No token Secret yet: a new serving, whose children are created unread.
        changed, live = await self.applier.apply_all(
            manifests, {token_key: token_live}, token_live is None
        )
        engine, router = n.engine_name(serving.name), n.router_name(serving.name)
        optional = [
            ("autoscaling/v2", "HorizontalPodAutoscaler", ns, engine),
            ("networking.k8s.io/v1", "NetworkPolicy", ns, engine),
            ("networking.k8s.io/v1", "NetworkPolicy", ns, router),
        ]
        planned = {key_of(m) for m in manifests}
        if token_live is None:  # a new serving (no token yet) has no other children
            keys: list[Key] = [(kind, o_ns, o_name) for _, kind, o_ns, o_name in optional]
            self.applier.absent.update(k for k in keys if k not in planned)
        await self.applier.prune(optional, planned)
        registered = await self._register(serving, pool, token)
        dep = live.get(("Deployment", ns, engine)) or {}
        ready = int((dep.get("status") or {}).get("readyReplicas", 0) or 0)
        rdep = live.get(("Deployment", ns, router)) or {}
        routers = int((rdep.get("status") or {}).get("readyReplicas", 0) or 0)
        want = serving.spec.replicas
        ok = registered and ready >= want and want > 0 and routers > 0
        msg = f"{ready}/{want} engines ready, {routers}/{serving.spec.routing.replicas} routers"
        if not registered:
            msg += f"; waiting for KVCachePool {pool_name!r} to create its credentials Secret"
        if changed:
            log.info("serving %s/%s: %d object(s) applied", ns, serving.name, changed)
        figures: dict[str, Any] = (
            {
                "prefixHitRate": await self.observe.hit_rate(engines),
                "eventStreams": await self.observe.event_streams(serving),
            }
            if observe
            else _carried(body, SERVING_FIGURES)
        )
        degraded = st.stale_streams(figures.get("eventStreams") or [])
        return st.with_gen(
            gen,
            replicas=want,
            readyReplicas=ready,
            selector=",".join(f"{k}={v}" for k, v in n.selector("engine", serving.name).items()),
            routerUrl=f"http://{router}.{ns}.svc.{self.settings.cluster_domain}",
            prefixHitRate=figures["prefixHitRate"],
            eventStreams=figures.get("eventStreams") or None,
            conditions=[
                st.condition("Ready", ok, "EnginesReady" if ok else "EnginesStarting", msg, gen),
                st.condition("Progressing", not ok, "Rollout" if not ok else "Settled", msg, gen),
                st.condition(
                    "Degraded",
                    bool(degraded),
                    "EventsNotFollowed" if degraded else "None",
                    degraded,
                    gen,
                ),
                st.condition("InvalidSpec", False, "Valid", "", gen),
            ],
        )

    async def _register(self, serving: Resource, pool: Resource, token: str) -> bool:
        """Make the serving's credential known to the pool's agents (its own key in the
        pool's credentials Secret); ``False`` while that Secret does not exist yet."""
        ns, secret = self.settings.namespace, n.pool_credentials_name(pool.name)
        live = await self.kube.get("v1", "Secret", ns, secret)
        if live is None:
            return False
        s_ns = serving.namespace or "default"
        entry = credential_entry(
            serving.name, s_ns, effective_scope(serving.spec, pool.spec), token
        )
        if unb64({k: v for k, v in (live.get("data") or {}).items() if k in entry}) != entry:
            await self.kube.merge_patch("v1", "Secret", ns, secret, {"data": b64(entry)})
        return True

    async def serving_pods_changed(self, namespace: str | None, name: str) -> None:
        """An engine pod of the serving became ready, unready or moved: reconcile it now
        (the router's endpoints follow) and write the status that results."""
        body = await self.kube.get(API_VERSION, "ModelServing", namespace, name)
        if body is None:
            return
        diff = st.diff(dict(body.get("status") or {}), await self.serving(body))
        if diff:
            await self.kube.merge_patch(
                API_VERSION, "ModelServing", namespace, name, {"status": diff}, "status"
            )

    async def pool_pods_changed(self, pool: str) -> None:
        """An agent pod of the pool changed: its servings' routers name the node agents."""
        for s in await self.servings_of(pool):
            meta = s["metadata"]
            await self.serving_pods_changed(meta.get("namespace"), meta["name"])

    async def serving_deleted(self, body: dict[str, Any]) -> None:
        """Withdraw the serving's credential from its pool's agents."""
        meta, spec = body["metadata"], body.get("spec") or {}
        self.locks.pop(("ModelServing", meta.get("namespace"), meta["name"]), None)
        pool = (spec.get("poolRef") or {}).get("name")
        if not pool:
            return
        k = credential_key(meta["name"], meta.get("namespace") or "default")
        await self.kube.merge_patch(
            "v1", "Secret", self.settings.namespace, n.pool_credentials_name(pool),
            {"data": {k: None}},
        )  # fmt: skip
