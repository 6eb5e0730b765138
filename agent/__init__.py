"""kvmarina.agent: the node agent (KV memory pool, block index, events) and its client.

Four audiences, one sub-package each (import contracts in pyproject.toml keep
them apart):

* ``node``: the daemon's state (pool, block index, slots, usage, claims);
* ``api``: its endpoints on the node (the engines' unix socket, HTTP);
* ``transfer``: moving blocks between agents;
* ``client`` and ``cache``: libraries that run inside other processes (engines,
  the vLLM connector, ``kvmarina.Cache`` users) and hold no node state.

``main`` wires the daemon together from ``config``; ``memory`` (shared regions:
allocated by the node, mapped by clients and transfers) serves them all.
``from kvmarina.agent import Cache`` gives the node-shared tensor cache.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Cache"]


def __getattr__(name: str) -> Any:
    if name == "Cache":
        from kvmarina.agent.cache.tensor_cache import Cache

        return Cache
    raise AttributeError(f"module 'kvmarina.agent' has no attribute {name!r}")
