"""Turn KVCachePool / ModelServing YAML into local processes, using the operator's planner.

What the operator would create as a DaemonSet, Deployments and ConfigMaps becomes,
here, one agent per simulated node, the engine replicas spread over the nodes, and
one router per serving — configured by the same functions
(``kvmarina.operator.components``), written to files under the run directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmarina.local.ports import free_ports
from kvmarina.local.rundir import socket_path
from kvmarina.local.supervisor import ProcessSpec, python_cmd, usable_cpus
from kvmarina.local.vllm import bind_cores, model_folder, vllm_python
from kvmarina.operator.components import (
    VLLM_MODULE,
    Endpoint,
    PlanError,
    agent_config,
    credentials_doc,
    engine_env,
    new_token,
    router_config,
    vllm_args,
    vllm_connector,
    vllm_env,
)
from kvmarina.operator.pki import PKIError, make_pool_pki
from kvmarina.serving import effective_scope
from kvmarina.validate import Issue, Resource, SpecError, load_file, pair_issues

log = logging.getLogger(__name__)


@dataclass
class FleetPlan:
    """Every process of a local fleet, in start order (agents, engines, routers)."""

    agents: list[ProcessSpec] = field(default_factory=list)
    engines: list[ProcessSpec] = field(default_factory=list)
    routers: list[ProcessSpec] = field(default_factory=list)

    @property
    def all(self) -> list[ProcessSpec]:
        return self.agents + self.engines + self.routers


def load_resources(paths: list[str]) -> tuple[list[Resource], list[Resource]]:
    """Pools and servings of the files; ``SpecError`` with every problem (field paths)."""
    pools: list[Resource] = []
    servings: list[Resource] = []
    problems: list[tuple[str, Issue]] = []
    for path in paths:
        try:
            resources, found = load_file(path)
        except OSError as exc:
            raise SpecError(path, [Issue("", f"cannot read: {exc.strerror}")]) from exc
        problems += found
        for r in resources:
            (pools if r.kind == "KVCachePool" else servings).append(r)
    if problems:
        raise SpecError(
            ", ".join(paths), [Issue(i.path, f"{label}: {i.message}") for label, i in problems]
        )
    names = {p.name for p in pools}
    for label, issue in pair_issues([*pools, *servings]):
        problems.append((label, issue))
    if problems:
        raise SpecError(
            ", ".join(paths), [Issue(i.path, f"{label}: {i.message}") for label, i in problems]
        )
    for s in servings:
        if s.spec.pool_ref.name not in names:
            raise SpecError(
                s.name,
                [
                    _issue(
                        "spec.poolRef.name",
                        f"pool {s.spec.pool_ref.name!r} is not defined in the given files "
                        f"(defined: {', '.join(sorted(names)) or 'none'})",
                    )
                ],
            )
    return pools, servings


def transfer_credentials(pool: Resource, pool_dir: Path) -> tuple[str | None, str | None]:
    """The files the operator's Secret would hold: the pool's transfer token (every
    agent of the pool shares it) and, for ``auth: mtls``, a CA and certificate.

    Without migration, neither. Without openssl, mTLS falls back to the token
    handshake alone (loopback only, said once in the log)."""
    mig = pool.spec.migration
    if not mig.enabled:
        return None, None
    token_file = pool_dir / "transfer.token"
    token_file.write_text(new_token())
    token_file.chmod(0o600)
    if mig.auth != "mtls":
        return str(token_file), None
    try:
        pem = asyncio.run(make_pool_pki(pool.name))
    except PKIError as exc:
        log.warning("pool %s: %s; local agents use the token handshake only", pool.name, exc)
        return str(token_file), None
    cert_dir = pool_dir / "certs"
    cert_dir.mkdir(exist_ok=True)
    for name, text in pem.items():
        (cert_dir / name).write_text(text)
        (cert_dir / name).chmod(0o600)
    return str(token_file), str(cert_dir)


def _issue(path: str, message: str) -> Issue:
    return Issue(path, message)


def plan_fleet(
    pools: list[Resource],
    servings: list[Resource],
    run_dir: Path,
    nodes: int,
    model_dir: str | None = None,
) -> FleetPlan:
    plan = FleetPlan()
    for pool in pools:
        mine = [s for s in servings if s.spec.pool_ref.name == pool.name]
        tokens = {s.name: new_token() for s in mine}
        pool_dir = run_dir / f"pool-{pool.name}"
        pool_dir.mkdir(parents=True, exist_ok=True)
        creds_file = pool_dir / "credentials.json"
        try:
            creds = credentials_doc(
                [
                    (
                        s.name,
                        s.namespace or "default",
                        effective_scope(s.spec, pool.spec),
                        tokens[s.name],
                    )
                    for s in mine
                ]
            )
        except PlanError as exc:
            raise SpecError(pool.name, [_issue("spec.sharing.scope", str(exc))]) from exc
        creds_file.write_text(json.dumps(creds))
        creds_file.chmod(0o600)
        token_file, cert_dir = transfer_credentials(pool, pool_dir)
        node_names = [f"{pool.name}-node-{i}" for i in range(nodes)]
        agent_urls, sockets = {}, {}
        for node, port in zip(node_names, free_ports(len(node_names)), strict=True):
            sock = str(socket_path(pool_dir, f"{node}.sock"))
            cfg = agent_config(
                pool.spec,
                node=node,
                socket_path=sock,
                credentials_file=str(creds_file),
                http_host="127.0.0.1",
                http_port=port,
                migration_port=0,
                migration_host="127.0.0.1",
                token_file=token_file,
                cert_dir=cert_dir,
            )
            cfg_file = pool_dir / f"{node}.agent.json"
            cfg_file.write_text(json.dumps(cfg, indent=2))
            agent_urls[node], sockets[node] = f"http://127.0.0.1:{port}", sock
            plan.agents.append(
                ProcessSpec(
                    f"agent-{node}",
                    "agent",
                    python_cmd("agent", "--config", str(cfg_file)),
                    ready_url=f"http://127.0.0.1:{port}/readyz",
                    node=node,
                    info={"url": agent_urls[node], "pool": pool.name},
                )
            )
        for s in mine:
            _plan_serving(
                plan, s, pool, node_names, agent_urls, sockets, tokens[s.name], pool_dir, model_dir
            )
    share_cores(plan.engines)
    return plan


#: engines' CPU niceness in local mode, above the router's and the agents' (0)
ENGINE_NICE = 5


def share_cores(engines: list[ProcessSpec], cores: int | None = None) -> None:
    """Engines sharing one machine behave like engines on separate accelerators:
    each gets ``cores // engines`` compute threads (at least one), so two engines
    prefilling at once run side by side instead of time-slicing 2 x 2 threads on
    2 cores, and their idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``).

    Why it matters: the router's queue term assumes an idle engine can start now.
    With every engine holding a thread per core, concurrent prefills shared the
    cores through OpenMP's barriers, so sending a request to an idle sibling bought
    nothing and the demo's policies tied. With one thread each on the 2-core
    machine: cache-aware p50 62.5 ms against the SGLang router's 67.0 (4 rounds
    each), the first turns 231 against 334 ms. OpenMP's default spinning, on its
    own, let one engine's idle threads take the cores another's prefill needed
    (per-round p50 jumped by up to 2x). A setting the user made wins.

    Engines also run at a lower CPU priority (``ENGINE_NICE``) than the router and
    the agents: on a cluster each has CPUs of its own, here they share the engines'.
    A router waiting for a core behind an engine's compute threads delays every
    request it forwards (the vLLM fleet: the router spent 3-4 ms of CPU a request,
    tokenizing and forwarding, stretched by its wait for a core)."""
    if cores is None:
        cores = len(usable_cpus())
    threads = str(max(1, cores // max(1, len(engines))))
    for var, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", threads)):
        if var in os.environ:
            continue
        for spec in engines:
            spec.env.setdefault(var, value)
    engines[:] = [replace(spec, nice=ENGINE_NICE) for spec in engines]


def _plan_serving(
    plan: FleetPlan,
    s: Resource,
    pool: Resource,
    node_names: list[str],
    agent_urls: dict[str, str],
    sockets: dict[str, str],
    token: str,
    pool_dir: Path,
    model_dir: str | None,
) -> None:
    ns = s.namespace or "default"
    token_file = pool_dir / f"{s.name}.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    vllm = s.spec.engine.type == "vllm"
    # the folder engines and router read: a preset is one only for vLLM (the reference
    # engine builds a preset's model itself and tokenizes bytes)
    folder = (
        model_folder(s.spec.model, pool_dir.parent, model_dir)
        if vllm or s.spec.model.preset is None
        else None
    )
    python = vllm_python() if vllm else None
    ports = free_ports(s.spec.replicas * (3 if vllm else 1) + 1)
    endpoints, engines = [], []
    for i in range(s.spec.replicas):
        node = node_names[i % len(node_names)]
        url = f"http://127.0.0.1:{ports[i]}"
        name = f"engine-{s.name}-{i}"
        info = {"url": url, "serving": s.name, "engine": s.spec.engine.type}
        if python is not None and folder is not None:
            events, replay = ports[s.spec.replicas + 2 * i : s.spec.replicas + 2 * i + 2]
            connector = (
                vllm_connector(
                    s.name,
                    ns,
                    s.spec,
                    pool.spec,
                    agent_socket=sockets[node],
                    credential_file=str(token_file),
                )
                if s.spec.engine.vllm.kv_connector
                else None
            )
            flags = vllm_args(
                s.spec,
                pool.spec,
                model_dir=folder,
                port=ports[i],
                host="127.0.0.1",
                events_port=events,
                replay_port=replay,
                log_level="warning",
                connector=connector,
            )
            argv: tuple[str, ...] = (python, "-m", VLLM_MODULE, *flags)
            # PYTHONSAFEPATH: started from a kvmarina checkout, the working directory
            # would shadow packages vLLM imports (transformers looks for `kernels`);
            # dev mode: a local fleet may reset vLLM's prefix cache (the demo does)
            env = {**vllm_env("warning"), "PYTHONSAFEPATH": "1", "VLLM_SERVER_DEV_MODE": "1"}
            kv = (f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}")
            # the router follows vLLM's own events, and the node agent's when vLLM reads
            # its pool (the connector)
            agent = agent_urls[node] if connector else None
            endpoints.append(Endpoint(name, url, node, agent, *kv))
        else:
            argv = python_cmd("engine")
            env = engine_env(
                s.name,
                ns,
                s.spec,
                pool.spec,
                port=ports[i],
                host="127.0.0.1",
                agent_socket=sockets[node],
                credential_file=str(token_file),
                model_dir=folder,
                pod_name=name,
            )
            endpoints.append(Endpoint(name, url, node, agent_urls[node]))
        engines.append(
            ProcessSpec(
                name, "engine", argv, ready_url=url + "/health", env=env, node=node, info=info
            )
        )
    if vllm:
        bind_cores(engines)
    plan.engines += engines
    router_port = ports[-1]
    cfg = router_config(s.name, ns, s.spec, pool.spec, endpoints, model_dir=folder)
    cfg_file = pool_dir / f"{s.name}.router.json"
    cfg_file.write_text(json.dumps(cfg, indent=2))
    url = f"http://127.0.0.1:{router_port}"
    plan.routers.append(
        ProcessSpec(
            f"router-{s.name}",
            "router",
            python_cmd(
                "router",
                "--config",
                str(cfg_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(router_port),
            ),
            ready_url=url + "/health",
            info={
                "url": url,
                "serving": s.name,
                "model": s.spec.model.name,
                "config": str(cfg_file),
            },
        )
    )
