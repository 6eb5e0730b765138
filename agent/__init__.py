"""kvmarina.agent: the node agent (KV memory pool, block index, events) and its client.

``from kvmarina.agent import Cache`` gives the node-shared tensor cache.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Cache"]


def __getattr__(name: str) -> Any:
    if name == "Cache":
        from kvmarina.agent.tensor_cache import Cache

        return Cache
    raise AttributeError(f"module 'kvmarina.agent' has no attribute {name!r}")
