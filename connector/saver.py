"""Saving vLLM's full blocks into the agent off the forward pass.

After each forward pass the worker hands that step's new full blocks to ``BlockSaver``
and goes on decoding; a thread leases agent pages, copies the blocks from vLLM's KV
into them and commits them (the agent checksums them and publishes their ``stored``
events). The copy reads vLLM's blocks later than the forward pass that wrote them, which
is safe because none of them can be written again before it is over:

- a running request's full blocks never change;
- a finished request's blocks are kept by vLLM until the worker reports the request's
  saves over: the scheduler answers ``request_finished`` with ``True`` for every request
  it planned a save for, and ``finished_sending`` hands those requests back once their
  saves are done (vLLM then frees the blocks);
- a preempted request's blocks are freed at once, so the step after a preemption waits
  for that request's saves (``wait_for``) before its loads and forward pass run.

A save that fails (the agent is gone, full, busy) only loses the cached copy: vLLM's own
blocks are never touched, so output is never wrong.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger("kvmarina.connector")

Save = tuple[str, int, bytes]  # (request id, vLLM block id, the block's pool hash)


@dataclass(frozen=True, slots=True)
class SaveJob:
    """One step's saves; ``ready`` (if any) waits until the forward pass's writes are
    visible to this thread (a CUDA event), before the first block is read."""

    saves: Sequence[Save]
    ready: Callable[[], None] | None = None


class BlockSaver:
    """Runs ``store`` (lease, copy, commit: the agent's side of one step's saves) on a
    thread of its own, and accounts for which requests still have saves in flight.

    Invariants: ``pending[r]`` is the number of queued or running jobs holding blocks of
    request ``r`` (no entry when none); ``seen`` holds every request ever named in a
    submitted job and not yet handed back; ``finishing`` is the part of ``seen`` that
    vLLM reported finished. A request leaves ``finishing`` (and ``seen``) exactly once,
    through ``finished_sending``, when it has no pending job: vLLM waits for exactly the
    requests the scheduler planned saves for, which are the ones submitted here.
    """

    def __init__(self, store: Callable[[Sequence[tuple[int, bytes]]], None] | None) -> None:
        self._store = store
        self._jobs: queue.SimpleQueue[SaveJob | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self.pending: dict[str, int] = {}
        self.seen: set[str] = set()
        self.finishing: set[str] = set()
        self.saved_blocks = 0
        self.failed_jobs = 0
        self._thread: threading.Thread | None = None
        if store is not None:
            self._thread = threading.Thread(target=self._run, name="kvmarina-saver", daemon=True)
            self._thread.start()

    # -- the worker's thread ------------------------------------------------------------
    def submit(self, saves: Sequence[Save], ready: Callable[[], None] | None = None) -> None:
        """Queue one step's saves (returns at once). Without a ``store`` (the connector
        is off in this worker) the requests are only recorded, so that vLLM still gets
        them back from ``finished_sending``."""
        if not saves:
            return
        reqs = {r for r, _, _ in saves}
        with self._lock:
            self.seen |= reqs
            if self._thread is None:
                return
            for r in reqs:
                self.pending[r] = self.pending.get(r, 0) + 1
        self._jobs.put(SaveJob(saves, ready))

    def wait_for(self, reqs: Iterable[str], timeout: float | None = None) -> bool:
        """Block until none of ``reqs`` has a save in flight; False on timeout."""
        wanted = set(reqs)
        with self._lock:
            return self._lock.wait_for(lambda: not wanted & self.pending.keys(), timeout)

    def finished_sending(self, finished: Iterable[str]) -> set[str]:
        """vLLM says ``finished`` requests are done: of those it waits for (and of the
        ones it was told about before), the ones whose saves are all over."""
        with self._lock:
            self.finishing |= self.seen & set(finished)
            done = {r for r in self.finishing if r not in self.pending}
            self.finishing -= done
            self.seen -= done
        return done

    def drain(self, timeout: float | None = None) -> bool:
        """Block until every submitted job is over; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: not self.pending, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (up to ``timeout``) and stop the thread."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    # -- the saver's thread -------------------------------------------------------------
    def _run(self) -> None:
        assert self._store is not None
        while (job := self._jobs.get()) is not None:
            try:
                if job.ready is not None:
                    job.ready()
                self._store([(b, h) for _, b, h in job.saves])
                self.saved_blocks += len(job.saves)
            except Exception:  # a failed save loses a cached copy, never the engine
                self.failed_jobs += 1
                if self.failed_jobs == 1:
                    log.exception("kvmarina connector: saving %d blocks failed", len(job.saves))
            finally:
                self._done(job)

    def _done(self, job: SaveJob) -> None:
        with self._lock:
            for r in {r for r, _, _ in job.saves}:
                left = self.pending[r] - 1
                if left:
                    self.pending[r] = left
                else:
                    del self.pending[r]
            self._lock.notify_all()
