"""Pulls of a router-hinted prefix from a peer node, beside vLLM's scheduler.

vLLM asks the connector how many tokens a new request finds outside its own cache
from inside its scheduler loop: a pull awaited there would stall every running
request on the engine for as long as the peer takes (up to ``pull_timeout_s`` when
it stalls). So a hinted request's pull runs on a thread of its own, over an agent
connection of its own (the agent answers one connection's requests in turn, so the
scheduler's lookups never queue behind a pull), and the connector tells vLLM "not
yet" (``None``) until it is over or ``pull_timeout_s`` has passed; the request's
lookup then finds whatever landed, and vLLM computes the rest.

Invariant: ``_jobs`` holds one entry per request the scheduler asked about and has
not finished: a running pull, a finished one, or none (nothing to pull).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvmarina.connector.agent_session import AgentSession

log = logging.getLogger("kvmarina.connector")


@dataclass(frozen=True, slots=True)
class PullJob:
    """Blocks ``hashes`` (the prompt's first ``len(hashes)``) from ``agent`` (``node``)."""

    agent: str
    node: str | None
    hashes: list[bytes]


@dataclass(slots=True)
class _Running:
    job: PullJob
    future: Future[dict[str, Any]]
    deadline: float
    reported: bool = False


class Puller:
    def __init__(self, session: AgentSession, timeout_s: float) -> None:
        self.session, self.timeout_s = session, timeout_s
        # one thread: the session's one connection answers one pull at a time anyway
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvmarina-pull")
        self._jobs: dict[str, _Running | None] = {}

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._jobs

    def start(self, req_id: str, job: PullJob | None) -> None:
        """Begin ``req_id``'s pull (``None``: it has none; it is recorded all the same)."""
        if job is None:
            self._jobs[req_id] = None
            return
        future = self._pool.submit(self.session.pull, job.agent, job.hashes, job.node)
        self._jobs[req_id] = _Running(job, future, time.monotonic() + self.timeout_s)

    def busy(self, req_id: str) -> bool:
        """Whether ``req_id`` should wait: its pull runs and its time is not up."""
        run = self._jobs.get(req_id)
        if run is None or run.reported:
            return False
        if not run.future.done() and time.monotonic() < run.deadline:
            return True
        run.reported = True
        self._report(run)
        return False

    def _report(self, run: _Running) -> None:
        job = run.job
        where = job.node or job.agent
        if not run.future.done():
            log.info(
                "kvmarina connector: the pull of %d blocks from %s is not over after %gs; "
                "computing them", len(job.hashes), where, self.timeout_s,
            )  # fmt: skip
            return
        try:
            reply = run.future.result()
        except Exception as exc:  # the session turns agent errors into replies; not these
            reply = {"pulled": 0, "error": f"{type(exc).__name__}: {exc}"}
        if int(reply.get("pulled", 0)) < len(job.hashes) and not reply.get("present"):
            log.info(
                "kvmarina connector: pulled %s of %d blocks from %s (%s)",
                reply.get("pulled", 0), len(job.hashes), where,
                reply.get("error") or f"{len(reply.get('missing') or [])} missing there",
            )  # fmt: skip

    def forget(self, req_id: str) -> None:
        """The request is over: a pull still running lands in the pool for others."""
        self._jobs.pop(req_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()
