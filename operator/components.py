"""Each component's configuration, derived from the CRs: the one place that decides it.

Configuration flows CR -> here -> (ConfigMap / env in a cluster, files / env
locally) -> component. The operator's manifests and ``kvmarina up`` both call
these pure functions, so a setting is translated once:

* ``agent_config``: the agent's config file (format of ``kvmarina.agent.config``);
* ``credentials_doc``: the pool-wide serving credentials file the agents read;
* ``engine_env``: the engine's ``KVMARINA_ENGINE_*`` environment (flags of
  ``kvmarina engine``);
* ``router_config``: the router's config file (format of ``kvmarina.router.config``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from kvmarina.layout import PRESET_KV_SHAPES, preset_identity
from kvmarina.specs import SCOPE_ORDER, KVCachePoolSpec, ModelServingSpec
from kvmarina.tenancy import scope_salt

AGENT_HTTP_PORT = 7470
ENGINE_PORT = 8000
ROUTER_PORT = 8080
AGENT_SOCKET_NAME = "agent.sock"


class PlanError(ValueError):
    """A combination of CRs that cannot run; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine pod as the router sees it."""

    name: str
    url: str
    node: str
    agent_url: str | None


def effective_scope(serving: ModelServingSpec, pool: KVCachePoolSpec) -> str:
    scope = serving.sharing.scope or pool.sharing.default_scope
    if SCOPE_ORDER[scope] > SCOPE_ORDER[pool.sharing.max_scope]:
        raise PlanError(
            f"spec.sharing.scope {scope!r} is wider than the pool's maxScope "
            f"{pool.sharing.max_scope!r}; narrow the serving's scope or widen the pool's"
        )
    return scope


def model_identity(serving: ModelServingSpec, pool: KVCachePoolSpec) -> str | None:
    """The identity engines seed block hashes with; ``None`` when only the weights know
    the layout (a PVC model: the engine reports it at run time)."""
    m = serving.model
    if m.preset is None:
        return None
    if m.preset not in PRESET_KV_SHAPES:
        raise PlanError(f"unknown preset {m.preset!r}")
    return preset_identity(
        m.preset, m.name, m.revision, m.dtype, pool.hashing.block_size
    ).canonical()


def hashing_doc(pool: KVCachePoolSpec) -> dict[str, Any]:
    h = pool.hashing
    return {"block_size": h.block_size, "algorithm": h.algorithm, "digest_bits": h.digest_bits}


def agent_config(
    pool: KVCachePoolSpec,
    *,
    node: str,
    socket_path: str,
    credentials_file: str,
    http_host: str = "0.0.0.0",
    http_port: int = AGENT_HTTP_PORT,
    migration_port: int | None = None,
    migration_host: str = "0.0.0.0",
    token_file: str | None = None,
    cert_dir: str | None = None,
) -> dict[str, Any]:
    mig = pool.migration
    return {
        "node": node,
        "socket_path": socket_path,
        "http_host": http_host,
        "http_port": http_port,
        "backend": pool.memory.backend,
        "device_bytes": pool.memory.device_bytes,
        "host_bytes": pool.memory.host_bytes,
        "page_size": pool.memory.page_bytes,
        "eviction": pool.eviction.policy,
        "reclaim_timeout_s": pool.eviction.reclaim_timeout_seconds,
        "hashing": hashing_doc(pool),
        "credentials_file": credentials_file,
        "migration": {
            "port": (migration_port if migration_port is not None else mig.port)
            if mig.enabled
            else 0,
            "host": migration_host,
            "auth": mig.auth,
            "token_file": token_file,
            "cert_dir": cert_dir,
            "streams_per_peer": mig.streams_per_peer,
            "timeout_s": float(mig.timeout_seconds),
            "checksum": mig.checksum,
        },
    }


def new_token() -> str:
    return secrets.token_urlsafe(32)


def credentials_doc(servings: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """``servings``: (name, namespace, effective scope, token) of every serving of the pool."""
    return {
        "servings": [
            {"name": n, "namespace": ns, "scope": scope, "token": token}
            for n, ns, scope, token in sorted(servings)
        ]
    }


def engine_env(
    name: str,
    namespace: str,
    serving: ModelServingSpec,
    pool: KVCachePoolSpec,
    *,
    port: int = ENGINE_PORT,
    host: str = "0.0.0.0",
    agent_socket: str,
    credential_file: str,
    model_dir: str | None = None,
) -> dict[str, str]:
    """The engine's environment. The router is its only client in a cluster, so it
    trusts the router's salt header; requests without one get the scope's salt."""
    m, b = serving.model, serving.budget
    scope = effective_scope(serving, pool)
    env = {
        "KVMARINA_ENGINE_MODEL": m.name,
        "KVMARINA_ENGINE_REVISION": m.revision,
        "KVMARINA_ENGINE_DTYPE": m.dtype,
        "KVMARINA_ENGINE_HOST": host,
        "KVMARINA_ENGINE_PORT": str(port),
        "KVMARINA_ENGINE_MAX_MODEL_LEN": str(m.max_model_len),
        "KVMARINA_ENGINE_MAX_BATCH": str(serving.engine.max_batch_size),
        "KVMARINA_ENGINE_MAX_WAITING": str(serving.engine.max_waiting),
        "KVMARINA_ENGINE_BLOCK_SIZE": str(pool.hashing.block_size),
        "KVMARINA_ENGINE_HASH_ALGORITHM": pool.hashing.algorithm,
        "KVMARINA_ENGINE_DIGEST_BITS": str(pool.hashing.digest_bits),
        "KVMARINA_ENGINE_TRUST_SALT_HEADER": "true",
        "KVMARINA_ENGINE_DEFAULT_SALT": scope_salt(scope, namespace, name),
        "KVMARINA_ENGINE_BUDGET_MIN": str(b.min_bytes),
        "KVMARINA_ENGINE_BUDGET_MAX": str(b.max_bytes),
        "KVMARINA_ENGINE_PRIORITY": str(b.priority),
        "KVMARINA_AGENT_SOCKET": agent_socket,
        "KVMARINA_ENGINE_CREDENTIAL_FILE": credential_file,
    }
    if m.preset is not None:
        env["KVMARINA_ENGINE_PRESET"] = m.preset
    else:
        env["KVMARINA_ENGINE_MODEL_DIR"] = model_dir or m.path
    return env


def router_config(
    name: str,
    namespace: str,
    serving: ModelServingSpec,
    pool: KVCachePoolSpec,
    pods: list[Endpoint],
    *,
    block_bytes: int | None = None,
) -> dict[str, Any]:
    if not pods:
        raise PlanError("the router needs at least one engine endpoint")
    identity = model_identity(serving, pool)
    if identity is None:
        raise PlanError(
            "the router needs the model identity; for a PVC model the engines report it "
            "once they are up (not supported yet: use a preset)"
        )
    r = serving.routing
    routing: dict[str, Any] = {
        "policy": r.policy,
        "session_header": r.session_header,
        "weights": {
            "queue": r.weights.queue,
            "prefill": r.weights.prefill,
            "migration": r.weights.migration,
        },
        "pull_hints": pool.migration.enabled,
    }
    if r.prefill_tokens_per_second is not None:
        routing["prefill_tokens_per_second"] = r.prefill_tokens_per_second
    if block_bytes is not None:
        routing["block_bytes"] = block_bytes
    sharing = serving.sharing
    return {
        "model": serving.model.name,
        "model_identity": identity,
        "serving": name,
        "namespace": namespace,
        "hashing": hashing_doc(pool),
        "sharing": {
            "scope": effective_scope(serving, pool),
            "tenant_header": sharing.tenant_header,
            "allow_client_salt": sharing.allow_client_salt,
        },
        "routing": routing,
        "pods": [
            {"name": p.name, "url": p.url, "node": p.node, "agent_url": p.agent_url} for p in pods
        ],
    }
