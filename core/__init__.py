"""kvmarina: the KV cache as a shared, node-level resource for LLM fleets.

The root package holds the contracts every part shares (block hashing, KV
layout, CR models, wire framing) and the ``kvmarina`` command. It imports no
part eagerly: heavier names are reached through lazy attributes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> "module:attribute", resolved on first access so that importing the
# core never pulls in torch, aiohttp or a part.
_LAZY: dict[str, str] = {"Cache": "kvmarina.agent.cache.tensor_cache:Cache"}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'kvmarina' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
