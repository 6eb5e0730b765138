"""The router's configuration file (JSON or YAML; the operator writes it into a
ConfigMap, local mode into a file). Reloaded on change without dropping requests.

Example (every key but ``model``, ``model_identity`` and ``pods`` is optional)::

    model: llama-3-8b                 # the name clients send as "model"
    model_identity: "llama-3-8b@main|L32/H8/D128/bfloat16/B16|tp0of1"   # or auto
    serving: chat                     # the ModelServing's name (scope "none" salts with it)
    namespace: team-a
    tokenizer_dir: null               # the model folder: tokenizer.json, chat template,
                                      # config.json; null -> byte tokenizer
    revision: main                    # with dtype: model_identity auto reads the folder's
    dtype: bfloat16                   # config.json and names it as the engines do
    engine: reference                 # reference | vllm (vLLM pods: KV events, cache_salt)
    kv_format: ""                     # the engines' block layout (vllm-cpu, ...): part of
                                      # the identity model_identity auto names
    hashing: {block_size: 16, algorithm: blake2b, digest_bits: 128}
    sharing:
      scope: namespace                # none | namespace | cluster
      tenant_header: x-tenant         # trusted header naming the tenant (or null)
      allow_client_salt: false        # fold a client's x-kvmarina-salt into the salt
    routing:
      policy: cache-aware             # cache-aware | least-load | round-robin | session
      session_header: x-session-id
      weights: {queue: 1.0, prefill: 1.0, migration: 1.0, duplication: 16.0,
                inflight: 1.0, sibling: 0.05, balance: 0.0}
      prefill_tokens_per_second: 8000 # initial per-pod rate, refined from observed TTFTs
      host_load_tokens_per_second: 200000  # cost of a host-tier hit (load to device)
      block_bytes: 131072             # KV bytes of one block (pull estimates); default: the
                                      # model_identity's layout, else 131072
      transfer_bytes_per_second: 2.0e9     # peer-to-peer bandwidth (agents' measured figure)
      pull_hints: true                # false: never ask an engine to pull from a peer
      replicas: 1                     # router replicas in front of the same engines
    pods:
      - {name: chat-0, url: "http://10.0.0.5:8000", node: node-a, agent_url: "http://10.0.0.5:7070"}
      - {name: vllm-0, url: "http://10.0.0.6:8000", node: node-b,
         kv_events: "tcp://10.0.0.6:5557", kv_replay: "tcp://10.0.0.6:5558"}
    limits:
      max_body_bytes: 4194304
      max_inflight: 512               # requests being proxied at once
      max_queue: 1024                 # requests waiting for a slot; beyond -> 429
      queue_timeout_s: 30
      retry_after_s: 1
      index_max_blocks: 4000000       # LRU cap of the block index (and of the fallback)
      connect_timeout_s: 2
      request_timeout_s: 600
      health_interval_s: 2
      load_interval_s: 1              # polls engines' /metrics for their own load; 0: never
      breaker_failures: 3             # consecutive failures that open a pod's breaker
      breaker_cooldown_s: 5

Keys are snake_case. Unknown keys are errors (a typo must not silently fall
back to a default). ``agent_url`` may be the engine's own URL (the simulated
engine serves ``/v1/events`` itself); pods without one feed no events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kvmarina.hashing import HashContract, HashingError
from kvmarina.layout import LayoutError, folder_identity, identity_layout

SCOPES = ("none", "namespace", "cluster")
DEFAULT_BLOCK_BYTES = 131072  # a block's KV where the identity names no layout
POLICIES = ("cache-aware", "least-load", "round-robin", "session")
ENGINES = ("reference", "vllm")


class ConfigError(ValueError):
    """A router configuration that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class PodConfig:
    """One engine pod. ``name`` is unique; ``url`` is http(s); ``kv_events`` and
    ``kv_replay`` (a vLLM pod's KV-event publisher and replay service) are tcp:// URLs."""

    name: str
    url: str
    node: str
    agent_url: str | None = None
    kv_events: str | None = None
    kv_replay: str | None = None


@dataclass(frozen=True, slots=True)
class SharingConfig:
    scope: str = "namespace"
    tenant_header: str | None = None
    allow_client_salt: bool = False


@dataclass(frozen=True, slots=True)
class Weights:
    queue: float = 1.0
    prefill: float = 1.0
    migration: float = 1.0
    duplication: float = 16.0
    # blocks a sibling engine is computing right now: this engine waits for them
    # (the agent says which until they are committed), then reads them like any
    # cached block
    inflight: float = 1.0
    # a hit served by a sibling of the engine that computed the prefix (same node,
    # same agent) costs this fraction of recomputing it: mapping another engine's
    # pages and colder CPU caches
    sibling: float = 0.05
    # a prompt no pod has an edge on (a new conversation) goes where the cache is
    # smallest: each block a pod caches costs this fraction of its recompute (what a
    # pod caches is what later turns will ask of it). Off by default: no benchmark
    # showed it paying, and it costs a cold decision a pass over every pod's count
    # (100 pods, benchmarks/router.py: 179-222 us against 89-101 at 0)
    balance: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = "cache-aware"
    session_header: str = "x-session-id"
    weights: Weights = field(default_factory=Weights)
    prefill_tokens_per_second: float = 8000.0
    host_load_tokens_per_second: float = 200000.0
    block_bytes: int = 0  # 0: the model identity's (``parse_config``)
    transfer_bytes_per_second: float = 2.0e9
    pull_hints: bool = True
    # router replicas in front of the same engines (the serving's routing.replicas):
    # each sees about 1/replicas of the requests, so its own queue counts that many
    # times over where the engines report nothing fresher
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_inflight: int = 512
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    retry_after_s: int = 1
    index_max_blocks: int = 4_000_000
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    health_interval_s: float = 2.0
    load_interval_s: float = 1.0  # polls each engine's /metrics for its own load; 0: never
    breaker_failures: int = 3
    breaker_cooldown_s: float = 5.0


@dataclass(frozen=True, slots=True)
class HashingConfig:
    block_size: int = 16
    algorithm: str = "blake2b"
    digest_bits: int = 128


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """A validated configuration. Invariants: pod names unique, ``pods`` non-empty,
    ``contract`` built from ``hashing``, scope and policy among the allowed values."""

    model: str
    model_identity: str
    pods: tuple[PodConfig, ...]
    serving: str = ""
    namespace: str = "default"
    tokenizer_dir: str | None = None
    engine: str = "reference"
    revision: str = "main"
    dtype: str = "float16"
    kv_format: str = ""
    hashing: HashingConfig = field(default_factory=HashingConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    limits: Limits = field(default_factory=Limits)

    @property
    def contract(self) -> HashContract:
        h = self.hashing
        return HashContract(h.block_size, h.algorithm, h.digest_bits // 8)


T = TypeVar("T")


def _build(cls: type[T], data: Any, path: str) -> T:
    """Construct dataclass ``cls`` from a mapping, checking keys and scalar types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown key(s) {', '.join(map(str, unknown))}")
    from dataclasses import MISSING

    missing = [
        n
        for n, f in known.items()
        if f.default is MISSING and f.default_factory is MISSING and n not in data
    ]
    if missing:
        raise ConfigError(f"{path or 'config'}: missing required key(s) {', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(known[name].type, value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


_NESTED: dict[str, type[Any]] = {
    "Weights": Weights,
    "SharingConfig": SharingConfig,
    "RoutingConfig": RoutingConfig,
    "Limits": Limits,
    "HashingConfig": HashingConfig,
}


def _coerce(type_name: Any, value: Any, path: str) -> Any:
    tname = str(type_name)
    if tname in _NESTED:
        return _build(_NESTED[tname], value, path)
    if tname.startswith("tuple[PodConfig"):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path} must be a non-empty list of pods")
        return tuple(_build(PodConfig, v, f"{path}[{i}]") for i, v in enumerate(value))
    optional = "None" in tname
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} must not be null")
    if tname.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
    elif tname == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
    elif tname == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{path} must be a non-negative integer, got {value!r}")
    elif tname == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{path} must be a non-negative number, got {value!r}")
        value = float(value)
    return value


def parse_config(data: Any) -> RouterConfig:
    """Validate a decoded config document; ``ConfigError`` names the bad field."""
    cfg = _build(RouterConfig, data, "")
    for key in ("model", "model_identity"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key} is required and must be non-empty")
    if cfg.sharing.scope not in SCOPES:
        raise ConfigError(f"sharing.scope must be one of {', '.join(SCOPES)}")
    if cfg.routing.policy not in POLICIES:
        raise ConfigError(f"routing.policy must be one of {', '.join(POLICIES)}")
    if cfg.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    for rate in ("prefill_tokens_per_second", "host_load_tokens_per_second"):
        if getattr(cfg.routing, rate) <= 0:
            raise ConfigError(f"routing.{rate} must be > 0")
    if cfg.routing.transfer_bytes_per_second <= 0:
        raise ConfigError("routing.transfer_bytes_per_second must be > 0")
    if cfg.routing.replicas < 1:
        raise ConfigError("routing.replicas must be >= 1 (the router replicas of the serving)")
    lim = cfg.limits
    if lim.max_inflight < 1 or lim.index_max_blocks < 1 or lim.breaker_failures < 1:
        raise ConfigError("limits.max_inflight, index_max_blocks and breaker_failures must be >= 1")
    names: set[str] = set()
    for i, pod in enumerate(cfg.pods):
        if pod.name in names:
            raise ConfigError(f"pods[{i}].name {pod.name!r} is not unique")
        names.add(pod.name)
        for key in ("url", "agent_url"):
            url = getattr(pod, key)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"pods[{i}].{key} must be an http(s) URL, got {url!r}")
        if not pod.node:
            raise ConfigError(f"pods[{i}].node must be non-empty")
        for key in ("kv_events", "kv_replay"):
            url = getattr(pod, key)
            if url is not None and not url.startswith("tcp://"):
                raise ConfigError(f"pods[{i}].{key} must be a tcp:// URL, got {url!r}")
        if pod.kv_replay is not None and pod.kv_events is None:
            raise ConfigError(f"pods[{i}].kv_replay needs kv_events (replay of which stream?)")
    try:
        _ = cfg.contract
    except HashingError as exc:
        raise ConfigError(f"hashing: {exc}") from exc
    if cfg.model_identity == "auto":
        cfg = replace(cfg, model_identity=_folder_identity(cfg))
    if cfg.routing.block_bytes < 0:
        raise ConfigError("routing.block_bytes must be > 0 (or left out: the model's)")
    if cfg.routing.block_bytes == 0:
        # what a pull moves per block: the engines' KV layout, which the identity names
        layout = identity_layout(cfg.model_identity)
        size = layout.bytes_per_block if layout is not None else DEFAULT_BLOCK_BYTES
        cfg = replace(cfg, routing=replace(cfg.routing, block_bytes=size))
    return cfg


def _folder_identity(cfg: RouterConfig) -> str:
    """``model_identity: auto``: the identity of the model folder (``tokenizer_dir``), as
    the engines derive it from the same ``config.json``."""
    if cfg.tokenizer_dir is None:
        raise ConfigError("model_identity auto needs tokenizer_dir (the model folder)")
    try:
        ident = folder_identity(
            cfg.tokenizer_dir,
            cfg.model,
            cfg.revision,
            cfg.dtype,
            cfg.hashing.block_size,
            cfg.kv_format,
        )
    except LayoutError as exc:
        raise ConfigError(f"model_identity auto: {exc}") from exc
    return ident.canonical()


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a JSON or YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read router config {p}: {exc}") from exc
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"{p} is not valid {kind}: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def config_to_dict(cfg: RouterConfig) -> dict[str, Any]:
    """The document form of a config (inverse of ``parse_config``)."""
    from dataclasses import asdict

    out = asdict(cfg)
    out["pods"] = [dict(p) for p in out["pods"]]
    return out
