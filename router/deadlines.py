"""Deadlines for many short-lived waits, checked by one coarse timer.

Why not ``asyncio.timeout`` per attempt: each costs a timer handle, a push onto the
loop's heap and a cancellation (with the bookkeeping that turns it into
``TimeoutError``), about 4 % of the router's CPU per proxied request, for a limit
that almost never fires. Here an attempt's deadline is a dictionary entry; one timer,
armed only while some deadline is pending, checks them every ``tick_s`` (a tenth of
the shortest limit, at most a second), so a limit fires up to a tick late.

Invariants: a timer is armed iff ``_due`` is non-empty; a key is in ``_expired`` iff
its task was cancelled for it and the key was not yet ``discard``-ed."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable


class Deadlines:
    def __init__(self) -> None:
        self._due: dict[Hashable, tuple[float, asyncio.Task[object]]] = {}
        self._expired: set[Hashable] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.tick_s = 1.0

    def add(self, key: Hashable, after_s: float) -> None:
        """Cancel the current task if ``key`` is still here ``after_s`` from now."""
        task = asyncio.current_task()
        assert task is not None, "a deadline belongs to a task"
        loop = task.get_loop()
        self._due[key] = (loop.time() + after_s, task)
        tick = min(1.0, after_s / 10)
        if tick < self.tick_s:
            self.tick_s = tick
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._timer is None:
            self._timer = loop.call_later(self.tick_s, self._check)

    def expired(self, key: Hashable) -> bool:
        """Whether ``key``'s task was cancelled because its deadline passed."""
        return key in self._expired

    def discard(self, key: Hashable) -> None:
        self._due.pop(key, None)
        self._expired.discard(key)

    def _check(self) -> None:
        self._timer = None
        if not self._due:
            return
        now = asyncio.get_running_loop().time()
        for key, (due, task) in list(self._due.items()):
            if now >= due:
                del self._due[key]
                self._expired.add(key)
                task.cancel()
        if self._due:
            self._timer = asyncio.get_running_loop().call_later(self.tick_s, self._check)
