"""Following one agent's block-event stream (docs/design.md "Block events").

``GET <agent_url>/v1/events`` streams ``kvmarina.framing`` frames: a ``Snapshot``,
then ``BlockEvent``s with consecutive ``seq``. On a gap, a new ``boot_id`` or a
``Resync`` the node's entries are dropped and the subscriber reconnects for a
fresh snapshot; while disconnected the node is not "live" and routing falls back
to the approximate index for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from kvmarina.events import BlockEvent, EventError, LoadRecord, Resync, Snapshot, from_wire
from kvmarina.framing import FrameDecoder, FrameError
from kvmarina.router.index import BlockIndex

log = logging.getLogger("kvmarina.router.events")


class StreamBroken(Exception):
    """The stream must be restarted from a snapshot (gap, new boot, resync)."""


class NodeFollower:
    """Applies one agent's stream to ``index`` under the name ``node``.

    Invariant: while ``live`` is true, ``index`` holds exactly what the agent's
    index held as of ``(boot_id, seq)``, restricted by the index's LRU cap."""

    def __init__(
        self,
        node: str,
        agent_url: str,
        index: BlockIndex,
        on_live: Callable[[str, bool], None],
        session: aiohttp.ClientSession,
        max_frame: int = 64 * 1024 * 1024,
        on_cleared: Callable[[str], None] | None = None,
        on_load: Callable[[str, LoadRecord], None] | None = None,
    ) -> None:
        self.node = node
        self.on_cleared = on_cleared
        self.on_load = on_load
        self.agent_url = agent_url.rstrip("/")
        self.index = index
        self.on_live = on_live
        self.session = session
        self.max_frame = max_frame
        self.boot_id: str | None = None
        self.seq = -1
        self.live = False
        self.events = 0
        self.resyncs = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"events-{self.node}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._set_live(False)

    def _set_live(self, live: bool) -> None:
        if live != self.live:
            self.live = live
            self.on_live(self.node, live)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._follow()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except StreamBroken as exc:
                log.info("events %s: %s; resyncing", self.node, exc)
                self.resyncs += 1
            except (aiohttp.ClientError, OSError, FrameError, EventError, TimeoutError) as exc:
                log.debug("events %s: %s", self.node, exc)
            self._set_live(False)
            self.index.drop_node(self.node)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _follow(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=2, sock_read=None)
        async with self.session.get(f"{self.agent_url}/v1/events", timeout=timeout) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="events endpoint"
                )
            dec = FrameDecoder(self.max_frame)
            async for chunk in resp.content.iter_any():
                dec.feed(chunk)
                for frame in dec.frames():
                    self.apply(from_wire(frame))
        raise StreamBroken("stream ended")

    def apply(self, rec: Snapshot | BlockEvent | Resync | LoadRecord) -> None:
        """Apply one record; ``StreamBroken`` when a fresh snapshot is needed."""
        if isinstance(rec, LoadRecord):  # not numbered: no index change, no gap
            if self.on_load is not None:
                self.on_load(self.node, rec)
            return
        if isinstance(rec, Snapshot):
            self.index.replace_node(self.node, rec.blocks)
            self.boot_id, self.seq = rec.boot_id, rec.seq
            self._set_live(True)
            return
        if isinstance(rec, Resync):
            raise StreamBroken(f"agent asked for a resync: {rec.reason}")
        if not self.live:
            raise StreamBroken("event before any snapshot")
        if rec.boot_id != self.boot_id:
            raise StreamBroken(f"new boot id {rec.boot_id} (was {self.boot_id})")
        if rec.seq != self.seq + 1:
            raise StreamBroken(f"gap: seq {rec.seq} after {self.seq}")
        self.seq = rec.seq
        self.events += 1
        if rec.type in ("stored", "moved"):
            self.index.store(self.node, rec.hashes, rec.tier or "device")
        elif rec.type == "evicted":
            self.index.evict(self.node, rec.hashes)
        else:  # cleared
            self.index.drop_node(self.node)
            if self.on_cleared is not None:
                self.on_cleared(self.node)
