"""A bounded admission queue: at most ``max_inflight`` requests proxied at once,
at most ``max_queue`` waiting; beyond that (or after ``timeout_s`` of waiting) the
caller gets ``Rejected`` and answers 429 with ``Retry-After``."""

from __future__ import annotations

import asyncio
from collections import deque


class Rejected(Exception):
    """The queue is full or the wait timed out."""


class Admission:
    """Invariants: ``inflight <= max_inflight`` except right after a shrink;
    ``len(waiters) <= max_queue``; waiters are admitted in FIFO order."""

    def __init__(self, max_inflight: int, max_queue: int, timeout_s: float) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.inflight = 0
        self.rejected = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def resize(self, max_inflight: int, max_queue: int, timeout_s: float) -> None:
        self.max_inflight, self.max_queue, self.timeout_s = max_inflight, max_queue, timeout_s
        self._wake()

    async def acquire(self) -> None:
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            raise Rejected("queue full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # admitted at the last moment: keep the slot
            fut.cancel()
            self._remove(fut)
            self.rejected += 1
            raise Rejected("timed out waiting in the queue") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                fut.cancel()
                self._remove(fut)
            raise

    def _remove(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inflight < self.max_inflight:
            fut = self._waiters.popleft()
            if not fut.done():
                self.inflight += 1
                fut.set_result(None)
