"""The agent's configuration: one JSON or YAML file (the operator's ConfigMap), env overrides.

Example::

    node: node-a
    socket_path: /var/run/kvmarina/agent.sock
    http_host: 0.0.0.0
    http_port: 7470
    backend: cpu                 # cpu | cuda
    device_bytes: 536870912      # device tier (GPU memory, or shared RAM for cpu)
    host_bytes: 536870912        # host tier (agent-private RAM); 0 disables it
    page_size: 2097152
    eviction: lru                # lru | lfu
    reclaim_timeout_s: 5
    hashing: {block_size: 16, algorithm: blake2b, digest_bits: 128}
    credentials_file: /etc/kvmarina/credentials/credentials.yaml
    event_queue: 4096            # per-subscriber backlog before a resync
    migration: {enabled: true, port: 7471, auth: token, token_file: ..., cert_dir: ...,
                streams_per_peer: 4, run_bytes: 33554432, timeout_s: 30}

``KVMARINA_AGENT_<KEY>`` environment variables override top-level scalar keys
(e.g. ``KVMARINA_AGENT_NODE``). Unknown keys are errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kvmarina.agent.node import checksums
from kvmarina.hashing import HashContract, HashingError


class ConfigError(ValueError):
    """An agent configuration that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """Peer transfers. A pull spreads its hashes over ``streams_per_peer``
    connections in runs of at most ``run_bytes`` (one request each). With ``enabled``
    false the agent opens no transfer port and refuses pulls (the pool's
    ``spec.migration.enabled``)."""

    enabled: bool = True
    port: int = 0
    host: str = "127.0.0.1"
    auth: str = "token"  # token | mtls
    token_file: str | None = None
    cert_dir: str | None = None
    streams_per_peer: int = 4
    run_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 30.0
    checksum: str = "xxh3"

    def __post_init__(self) -> None:
        if self.auth not in ("token", "mtls"):
            raise ConfigError(f"migration.auth {self.auth!r}: use token or mtls")
        if not 1 <= self.streams_per_peer <= 64:
            raise ConfigError(f"migration.streams_per_peer {self.streams_per_peer}: use 1..64")
        if self.run_bytes < 1:
            raise ConfigError(f"migration.run_bytes {self.run_bytes} must be >= 1")
        if self.timeout_s <= 0:
            raise ConfigError(f"migration.timeout_s {self.timeout_s} must be > 0")
        if self.checksum not in checksums.ALGORITHMS:
            raise ConfigError(
                f"migration.checksum {self.checksum!r}: use {' or '.join(checksums.ALGORITHMS)}"
            )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str = "local"
    socket_path: str = "/tmp/kvmarina-agent.sock"
    http_host: str = "127.0.0.1"
    http_port: int = 7470
    backend: str = "cpu"
    device_bytes: int = 256 * 1024 * 1024
    host_bytes: int = 0
    page_size: int = 2 * 1024 * 1024
    eviction: str = "lru"
    reclaim_timeout_s: float = 5.0
    hashing: dict[str, Any] = field(default_factory=dict)
    credentials_file: str | None = None
    event_queue: int = 4096
    migration: MigrationConfig = field(default_factory=MigrationConfig)

    def __post_init__(self) -> None:
        if self.backend not in ("cpu", "cuda"):
            raise ConfigError(f"backend {self.backend!r}: use cpu or cuda")
        if self.eviction not in ("lru", "lfu"):
            raise ConfigError(f"eviction {self.eviction!r}: use lru or lfu")
        if self.page_size < 4096 or self.page_size % 4096:
            raise ConfigError(f"page_size {self.page_size} must be a multiple of 4096")
        if self.device_bytes < self.page_size:
            raise ConfigError(f"device_bytes {self.device_bytes} is smaller than one page")
        if self.host_bytes < 0:
            raise ConfigError("host_bytes must be >= 0")
        self.contract()  # validates the hashing section

    def contract(self) -> HashContract:
        h = self.hashing
        try:
            return HashContract(
                int(h.get("block_size", 16)),
                str(h.get("algorithm", "blake2b")),
                int(h.get("digest_bits", 128)) // 8,
            )
        except (HashingError, ValueError, TypeError) as exc:
            raise ConfigError(f"hashing: {exc}") from None

    @property
    def device_pages(self) -> int:
        return self.device_bytes // self.page_size

    @property
    def host_pages(self) -> int:
        return self.host_bytes // self.page_size


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    kwargs = dict(data)
    if cls is AgentConfig and isinstance(kwargs.get("migration"), dict):
        kwargs["migration"] = _build(MigrationConfig, kwargs["migration"], f"{where}.migration")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read agent config {p}: {exc.strerror}") from None
        try:
            loaded = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{p} is not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping")
        data.update(loaded)
    scalar = {f.name: f for f in fields(AgentConfig) if f.name not in ("hashing", "migration")}
    for name, f in scalar.items():
        env = os.environ.get(f"KVMARINA_AGENT_{name.upper()}")
        if env is not None:
            data[name] = _coerce(env, f.type, name)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(AgentConfig, data, path or "agent config")  # type: ignore[no-any-return]


def _coerce(value: str, typ: Any, name: str) -> Any:
    text = str(typ)
    try:
        if "int" in text:
            return int(value)
        if "float" in text:
            return float(value)
    except ValueError:
        raise ConfigError(f"KVMARINA_AGENT_{name.upper()}={value!r} is not a number") from None
    return value
