"""Operator benchmark: many ModelServings created at once against kmock's API emulator.

The real operator (kopf + ``kvmarina.operator.handlers``) runs against
``kmock.KubernetesEmulator`` over HTTP on loopback, in this process (one event loop:
the emulator's CPU is counted against the operator). One pool, then ``--servings``
servings POSTed at once.

* ``seconds_to_converge``: until every serving is planned (its engine Deployment
  exists and its status is written);
* ``requests_per_serving``: API requests (the operator's, kopf's included) per serving
  per reconcile pass at steady state (timers only, nothing to change), counted
  by the emulator over ``--steady`` seconds; ``converge_requests_per_serving``: during
  the creation phase;
* baseline: the same children POSTed straight to the emulator by a plain client
  (``direct_seconds``): the floor that API round trips alone impose.

kmock 0.8 keeps every request it served and re-filters that whole log on each new
request (a GET costs ~0.1 ms per earlier request), which would make any client look
quadratic. ``emulator()`` therefore cuts the emulator's logs (``_requests`` of the
root and of each reaction: private lists) to the request being served, and counts
the operator's requests, for both runs. (Draining them every 0.2 s instead, as this
benchmark first did, left the emulator at ~24 ms of CPU per request: 88 s to
converge, direct POSTs 13 s.)

Targets: <= 60 s for 200, <= 15 requests per serving at steady state.

    python benchmarks/operator_reconcile.py [--servings 200] [--resync 10] [--steady 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parent.parent
NS = "kvmarina-system"
API = "/apis/kvmarina.io/v1alpha1"
UA = {"User-Agent": "kvmarina-benchmark"}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servings", type=int, default=200)
    p.add_argument("--resync", type=float, default=10.0, help="operator timer interval (s)")
    p.add_argument("--steady", type=float, default=20.0, help="steady-state window (s)")
    p.add_argument("--timeout", type=float, default=120.0)
    return p.parse_args(argv)


def _declare(kmock: Any) -> None:
    kmock.resources.load_bundled()
    for plural, kind, namespaced in (
        ("kvcachepools", "KVCachePool", False),
        ("modelservings", "ModelServing", True),
    ):
        kmock.resources[f"kvmarina.io/v1alpha1/{plural}"] = {
            "kind": kind,
            "namespaced": namespaced,
            "verbs": VERBS,
            "subresources": {"status"},
        }


def _docs(n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    pool, serving = yaml.safe_load_all((REPO / "examples" / "local.yaml").read_text())
    pool["metadata"].update(resourceVersion="1", uid="uid-pool")
    pool["spec"]["memory"]["device"] = "64Gi"  # room for every serving's minimum
    out = []
    for i in range(n):
        s = copy.deepcopy(serving)
        s["metadata"].update(name=f"s{i:04d}", resourceVersion="1", uid=f"uid-s{i}")
        s["spec"]["budget"] = {"min": "16Mi", "max": "256Mi"}
        out.append(s)
    return pool, out


def emulator() -> Any:
    """kmock's API emulator whose request logs are kept down to the request being served.

    kmock matches each request against every reaction by scanning that reaction's
    view of the whole request log, so an undrained log makes every request cost
    more than the last. Here the log is cut to the one request before kmock
    matches it (requests already in flight did their matching before their first
    ``await``), and the operator's requests (not the benchmark's own) are counted."""
    import kmock as km

    class Emulator(km.KubernetesEmulator):  # type: ignore[misc]
        counted = 0  # the operator's requests served so far

        async def _handle(self, request: Any) -> Any:
            if request.headers.get("User-Agent") != UA["User-Agent"]:
                self.counted += 1
            self._requests[:] = [request]
            for reaction in self._payloads:  # each reaction keeps its own log as well
                reaction._requests.clear()
            return await super()._handle(request)

    return Emulator()


async def _converged(http: aiohttp.ClientSession, url: str, n: int) -> int:
    async with http.get(f"{url}{API}/namespaces/default/modelservings") as r:
        items = (await r.json())["items"]
    async with http.get(f"{url}/apis/apps/v1/namespaces/default/deployments") as r:
        deps = {d["metadata"]["name"] for d in (await r.json())["items"]}
    done = 0
    for s in items:
        conds = {c["type"] for c in (s.get("status") or {}).get("conditions") or []}
        if "Progressing" in conds and f"{s['metadata']['name']}-engine" in deps:
            done += 1
    return done


async def _direct(url: str, n: int) -> float:
    """Baseline: POST the planned children of ``n`` servings with a plain client."""
    import kmock as km

    from kvmarina.operator.plan_serving import plan_serving
    from kvmarina.operator.settings import Settings
    from kvmarina.validate import parse_resource

    pool_doc, servings = _docs(n)
    pool = parse_resource(pool_doc)
    manifests = [
        m
        for s in servings
        for m in plan_serving(parse_resource(s), "uid", pool, Settings(), "T", [])
    ]
    async with emulator() as emu, km.Server(emu):
        _declare(emu)
        base = str(emu.url).rstrip("/")
        from kvmarina.operator.kube import path

        async with aiohttp.ClientSession(headers=UA) as http:
            sem = asyncio.Semaphore(32)

            async def post(m: dict[str, Any]) -> None:
                meta = m["metadata"]
                async with (
                    sem,
                    http.post(
                        base + path(m["apiVersion"], m["kind"], meta.get("namespace")), json=m
                    ) as r,
                ):
                    assert r.status < 300, await r.text()

            t0 = time.perf_counter()
            await asyncio.gather(*(post(m) for m in manifests))
            seconds = time.perf_counter() - t0
        return seconds


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import kmock as km

    async with emulator() as emu, km.Server(emu):
        _declare(emu)
        url = str(emu.url).rstrip("/")
        os.environ.update(
            KVMARINA_KUBE_SERVER=url,
            KVMARINA_OPERATOR_NAMESPACE=NS,
            KVMARINA_RESYNC_SECONDS=str(args.resync),
        )
        import kopf

        from kvmarina.operator import handlers  # reads the settings above

        @kopf.on.login()
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url)

        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        task = asyncio.create_task(
            kopf.operator(settings=settings, clusterwide=True, standalone=True)
        )
        pool, servings = _docs(args.servings)
        try:
            async with aiohttp.ClientSession(headers=UA) as http:
                async with http.post(f"{url}{API}/kvcachepools", json=pool) as r:
                    assert r.status < 300
                await asyncio.sleep(1.0)  # the pool's children exist before the rush
                start_reqs = emu.counted
                t0 = time.perf_counter()

                async def create(s: dict[str, Any]) -> None:
                    ns_url = f"{url}{API}/namespaces/default/modelservings"
                    async with http.post(ns_url, json=s) as r:
                        assert r.status < 300, await r.text()

                await asyncio.gather(*(create(s) for s in servings))
                done = 0
                while done < args.servings:
                    if time.perf_counter() - t0 > args.timeout:
                        break
                    await asyncio.sleep(1.0)
                    done = await _converged(http, url, args.servings)
                seconds = time.perf_counter() - t0
                converge_reqs = emu.counted - start_reqs
                # steady state: let the creation-time handlers and first timers drain
                await asyncio.sleep(args.resync)
                mark = emu.counted
                await asyncio.sleep(args.steady)
                steady = emu.counted - mark
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await handlers.close()
        passes = args.steady / args.resync
    return {
        "servings": args.servings,
        "converged": done,
        "seconds_to_converge": round(seconds, 2),
        "converge_requests_per_serving": round(converge_reqs / args.servings, 1),
        "requests_per_serving": round(steady / args.servings / passes, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("kopf", "kvmarina", "aiohttp", "kmock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    result = asyncio.run(run(args))
    t1 = time.perf_counter()
    result["direct_seconds"] = round(asyncio.run(_direct("", args.servings)), 2)
    print(f"(phases: operator run {t1 - t0:.0f} s, baseline {time.perf_counter() - t1:.0f} s)")
    result["resync_seconds"] = args.resync
    report(
        [
            ("figure", "operator", "baseline / target"),
            (
                "seconds to converge",
                f"{result['seconds_to_converge']:.2f}",
                f"direct POSTs {result['direct_seconds']:.2f} s; target <= 60 s",
            ),
            (
                "requests/serving/pass (steady)",
                f"{result['requests_per_serving']:.1f}",
                "target <= 15",
            ),
            (
                "requests/serving (creation)",
                f"{result['converge_requests_per_serving']:.1f}",
                "",
            ),
            ("servings converged", f"{result['converged']}/{result['servings']}", ""),
        ],
        result,
    )
    return 0 if result["converged"] == result["servings"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
