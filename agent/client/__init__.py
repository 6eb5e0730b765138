"""The engine's side of the agent: the only part of ``kvmarina.agent`` engines import.

* ``connection``: ``AgentClient``, a node agent over its unix socket (register,
  lease, commit, lookup, release; the scope region mapped once, then zero-copy
  ``block(page, index)`` views);
* ``hits``: what a lookup answers (``Hits``: the cached run as columns);
* ``local``: ``LocalPool``, the same API over a private in-process pool
  (``kvmarina engine --no-agent``).

These run inside engine processes: they hold no node state (``local`` creates its
own pool on first use).
"""

from __future__ import annotations

from kvmarina.agent.client.connection import (
    AgentBusy,
    AgentClient,
    AgentError,
    AgentFull,
    AgentUnavailable,
    Budget,
    RegionBlocks,
)
from kvmarina.agent.client.hits import NO_HITS, TIER_CODES, Hit, Hits
from kvmarina.agent.client.local import LocalPool

__all__ = [
    "NO_HITS",
    "TIER_CODES",
    "AgentBusy",
    "AgentClient",
    "AgentError",
    "AgentFull",
    "AgentUnavailable",
    "Budget",
    "Hit",
    "Hits",
    "LocalPool",
    "RegionBlocks",
]
