"""The connector's settings: vLLM's ``kv_connector_extra_config``, written by the
operator and local mode (``components.vllm_connector_config``), never by hand.

Keys: ``agent_socket`` and ``credential_file`` (as the reference engine has them),
``model_identity`` (the pool's block identity of this serving, or ``auto``: from the
model folder's ``config.json`` with ``revision``, ``dtype`` and ``kv_format``),
``hashing`` (the pool's contract), ``default_salt`` (for requests that carry no
``cache_salt``, i.e. that did not come through the router), ``budget`` (min/max
bytes, priority) and ``pull_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvmarina.hashing import HashContract, HashingError
from kvmarina.layout import LayoutError, folder_identity


class ConnectorConfigError(ValueError):
    """Settings the connector cannot run with; the message names the key."""


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """Validated settings. Invariant: ``contract`` is a valid hashing contract and
    ``model_identity`` is resolved (never ``auto``)."""

    agent_socket: str
    credential_file: str
    model_identity: str
    contract: HashContract
    default_salt: str = ""
    budget_min: int = 0
    budget_max: int = 1 << 40
    priority: int = 100
    pull_timeout_s: float = 10.0
    retry_s: float = 5.0

    @classmethod
    def parse(cls, extra: Mapping[str, Any], model_dir: str | None = None) -> ConnectorSettings:
        """From vLLM's extra config; ``model_dir`` resolves ``model_identity: auto``."""

        def need(key: str) -> Any:
            if key not in extra or extra[key] in (None, ""):
                raise ConnectorConfigError(f"kv_connector_extra_config lacks {key!r}")
            return extra[key]

        h = extra.get("hashing") or {}
        try:
            contract = HashContract(
                int(h.get("block_size", 16)),
                str(h.get("algorithm", "blake2b")),
                int(h.get("digest_bits", 128)) // 8,
            )
        except (HashingError, TypeError, ValueError) as exc:
            raise ConnectorConfigError(f"kv_connector_extra_config.hashing: {exc}") from exc
        identity = str(need("model_identity"))
        if identity == "auto":
            identity = _folder_identity(extra, model_dir, contract.block_size)
        budget = extra.get("budget") or {}
        try:
            return cls(
                agent_socket=str(need("agent_socket")),
                credential_file=str(need("credential_file")),
                model_identity=identity,
                contract=contract,
                default_salt=str(extra.get("default_salt", "")),
                budget_min=int(budget.get("min", 0)),
                budget_max=int(budget.get("max", 1 << 40)),
                priority=int(budget.get("priority", 100)),
                pull_timeout_s=float(extra.get("pull_timeout_s", 10.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConnectorConfigError(f"kv_connector_extra_config: {exc}") from exc


def _folder_identity(extra: Mapping[str, Any], model_dir: str | None, block_size: int) -> str:
    if not model_dir:
        raise ConnectorConfigError("model_identity auto needs the model folder vLLM loads")
    try:
        return folder_identity(
            model_dir,
            str(extra.get("model_name") or model_dir),
            str(extra.get("revision", "main")),
            str(extra.get("dtype", "float16")),
            block_size,
            str(extra.get("kv_format", "")),
        ).canonical()
    except LayoutError as exc:
        raise ConnectorConfigError(f"model_identity auto: {exc}") from exc
