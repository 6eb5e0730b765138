"""A session with the node agent that survives the agent's absence.

Both sides of the connector (vLLM's scheduler and its worker) register with the
serving's credential, as the reference engine does. When the agent is not there (not
started yet, restarting, gone), every call returns the answer that makes vLLM compute
for itself — no hits, nothing saved — and says so once in the log; the session tries
again at most every ``retry_s`` seconds. A new agent boot is a new region: the worker
maps it again before reading any block it names (``boot_id``). The worker's save thread
and its main thread share one session: calls take turns (one request in flight on the
agent's socket at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvmarina.agent.client import NO_HITS, AgentClient, AgentError, AgentUnavailable, Budget, Hits
from kvmarina.connector.settings import ConnectorSettings

log = logging.getLogger("kvmarina.connector")
T = TypeVar("T")


class AgentSession:
    """Invariant: ``client`` is connected (registered, region mapped) or ``None``; a
    ``None`` client is retried no sooner than ``retry_s`` after the last failure."""

    def __init__(self, settings: ConnectorSettings, block_bytes: int, role: str) -> None:
        self.settings, self.block_bytes, self.role = settings, block_bytes, role
        self.client: AgentClient | None = None
        self.boot_id: str | None = None
        self._next_try = 0.0
        self._said_gone = False
        self._lock = threading.RLock()

    def _budget(self) -> Budget:
        s, b = self.settings, self.block_bytes
        return Budget(s.budget_min // b, max(1, s.budget_max // b), s.priority)

    def connect(self) -> AgentClient | None:
        with self._lock:
            return self._connect()

    def _connect(self) -> AgentClient | None:
        if self.client is not None:
            return self.client
        now = time.monotonic()
        if now < self._next_try:
            return None
        try:
            with open(self.settings.credential_file) as f:
                token = f.read().strip()
            client = AgentClient(
                self.settings.agent_socket, token, self.block_bytes, self._budget()
            ).connect()
        except (AgentError, OSError) as exc:
            self._gone(f"cannot register with the agent: {exc}")
            return None
        self.client, self.boot_id = client, str(client.info.get("boot_id", ""))
        if self._said_gone:
            log.info("kvmarina connector (%s): the agent is back (%s)", self.role, self.boot_id)
        self._said_gone = False
        return client

    def _gone(self, why: str) -> None:
        if self.client is not None:
            self.client.close()
        self.client, self.boot_id = None, None
        self._next_try = time.monotonic() + self.settings.retry_s
        if not self._said_gone:
            self._said_gone = True
            log.warning(
                "kvmarina connector (%s): %s; vLLM computes every prefix itself until the "
                "agent is back",
                self.role,
                why,
            )

    def call(self, fn: Callable[[AgentClient], T], default: T) -> T:
        """``fn(client)``, or ``default`` when there is no agent (said once)."""
        with self._lock:
            client = self._connect()
            if client is None:
                return default
            try:
                return fn(client)
            except AgentUnavailable as exc:
                self._gone(str(exc))
                return default
            except AgentError as exc:  # full, busy, refused: this call only
                log.debug("kvmarina connector (%s): %s", self.role, exc)
                return default

    def lookup(self, hashes: list[bytes]) -> Hits:
        return self.call(lambda c: c.lookup(hashes), NO_HITS)

    def lookup_claim(self, hashes: list[bytes]) -> tuple[Hits, int]:
        """The agent's hits, and how many blocks after them other engines compute now;
        the rest become this session's to compute (see ``kvmarina.agent.node.claims``)."""
        nothing: tuple[Hits, int] = (NO_HITS, 0)
        return self.call(lambda c: c.lookup_claim(hashes), nothing)

    def release(self, hashes: list[bytes], unclaim: list[bytes] | None = None) -> None:
        if hashes or unclaim:
            self.call(lambda c: c.release(hashes, unclaim=unclaim), None)

    def pull(self, peer: str, hashes: list[bytes], node: str | None) -> dict[str, Any]:
        return self.call(lambda c: c.pull(peer, hashes, node), {"pulled": 0})

    def close(self) -> None:
        with self._lock:
            if self.client is not None:
                self.client.close()
                self.client = None
