"""The block-event publisher: the node agent's, and the simulated engine's (docs/design.md
"Block events"); the records themselves are ``kvmarina.events``.

Events are numbered per boot. Each subscriber has a bounded queue and gets a snapshot
first; one that falls behind is not given a gap: its queue is replaced by a ``Resync``
marker followed by a fresh snapshot, and numbering continues from there. ``stream``
writes one subscriber's records as frames, what is queued in one write, until it goes away
or the log is closed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kvmarina.events import BlockEvent, LoadRecord, Record, Resync, Snapshot
from kvmarina.framing import encode_frame

#: A snapshot names every block of the node: far larger than any other record.
MAX_SNAPSHOT_FRAME = 1 << 30
#: records written to a subscriber in one go at most
MAX_BATCH = 256


@dataclass(eq=False)
class Subscriber:
    """One stream's queue: records in ``seq`` order; ``None`` ends the stream."""

    queue: asyncio.Queue[Record | None]
    resyncs: int = 0


@dataclass
class EventLog:
    """Invariant: ``seq`` is the number of the last event published this boot;
    every subscriber's queue holds records in ``seq`` order with no gap."""

    node: str
    snapshot_fn: Callable[[], dict[bytes, str]]
    max_queue: int = 4096
    boot_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0
    subscribers: list[Subscriber] = field(default_factory=list)
    published: int = 0
    resyncs: int = 0  # snapshots re-sent to subscribers that fell behind, this boot

    def snapshot(self) -> Snapshot:
        return Snapshot(self.boot_id, self.seq, self.node, self.snapshot_fn())

    def subscribe(self) -> Subscriber:
        sub = Subscriber(asyncio.Queue())
        sub.queue.put_nowait(self.snapshot())
        self.subscribers.append(sub)
        return sub

    def lag(self) -> int:
        """Records the slowest subscriber has not taken yet (0 without subscribers)."""
        return max((sub.queue.qsize() for sub in self.subscribers), default=0)

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def close(self) -> None:
        """End every stream (a server shutting down does not wait for them)."""
        for sub in self.subscribers:
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)

    def publish(
        self, kind: str, hashes: tuple[bytes, ...] | list[bytes] = (), tier: str | None = None
    ) -> None:
        if kind != "cleared" and not hashes:
            return
        self.seq += 1
        self.published += 1
        if not self.subscribers:
            return  # numbered all the same: a later snapshot carries this seq
        event = BlockEvent(kind, self.boot_id, self.seq, tuple(hashes), tier)
        for sub in self.subscribers:
            if sub.queue.qsize() >= self.max_queue:
                self._resync(sub, "subscriber fell behind")
            else:
                sub.queue.put_nowait(event)

    def publish_load(self, load: LoadRecord) -> None:
        """Push an engine's load to every subscriber with room for it: a full queue is
        behind already, and the next report replaces this one."""
        for sub in self.subscribers:
            if sub.queue.qsize() < self.max_queue:
                sub.queue.put_nowait(load)

    def _resync(self, sub: Subscriber, reason: str) -> None:
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.resyncs += 1
        self.resyncs += 1
        sub.queue.put_nowait(Resync(self.boot_id, reason))
        sub.queue.put_nowait(self.snapshot())


async def stream(log: EventLog, write: Callable[[bytes], Awaitable[Any]]) -> None:
    """Subscribe and ``write`` each record as a frame, the snapshot first, until the
    peer goes away or ``log.close()``. The records queued by the time the stream
    wakes go out in one write, and of the load reports among them only each pod's
    last: one send and one wake-up of the reader for what a prefill's end publishes
    (stored, evicted, load), where a write a record cost the engine and every
    subscriber a round of the loop each."""
    sub = log.subscribe()
    try:
        while (record := await sub.queue.get()) is not None:
            batch = [record]
            while len(batch) < MAX_BATCH and not sub.queue.empty():
                if (nxt := sub.queue.get_nowait()) is None:
                    sub.queue.put_nowait(None)  # the end, after this batch
                    break
                batch.append(nxt)
            await write(b"".join(_frames(batch)))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        log.unsubscribe(sub)


def _frames(batch: list[Record]) -> list[bytes]:
    """Each record's frame, in order, but a load report only where no later one in
    ``batch`` names the same pod (it would replace it on arrival)."""
    later: set[str] = set()
    out: list[bytes] = []
    for rec in reversed(batch):
        if isinstance(rec, LoadRecord):
            if rec.pod in later:
                continue
            later.add(rec.pod)
        out.append(encode_frame(rec.to_wire(), max_size=MAX_SNAPSHOT_FRAME))
    out.reverse()
    return out
