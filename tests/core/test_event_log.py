"""The one block-event publisher (``kvmarina.event_log``), as the agent and the simulated
engine stream it: the snapshot first, then events as frames, until the log is closed."""

from __future__ import annotations

import asyncio

from kvmarina.event_log import EventLog, stream
from kvmarina.events import BlockEvent, Snapshot, from_wire
from kvmarina.framing import FrameDecoder


async def test_a_stream_sends_the_snapshot_then_events_and_ends_when_closed() -> None:
    log = EventLog("n", lambda: {b"\x01" * 16: "device"})
    frames: list[bytes] = []

    async def write(frame: bytes) -> None:
        frames.append(frame)

    task = asyncio.create_task(stream(log, write))
    await asyncio.sleep(0)
    log.publish("stored", [b"\x02" * 16], "device")
    log.publish("evicted", (b"\x01" * 16,))
    await asyncio.sleep(0)
    log.close()
    await asyncio.wait_for(task, 5)
    assert log.subscribers == []  # the stream unsubscribed on its way out
    decoder = FrameDecoder()
    decoder.feed(b"".join(frames))
    records = [from_wire(obj) for obj in decoder.frames()]
    assert isinstance(records[0], Snapshot) and records[0].blocks == {b"\x01" * 16: "device"}
    assert [(r.type, r.seq) for r in records[1:] if isinstance(r, BlockEvent)] == [
        ("stored", 1),
        ("evicted", 2),
    ]
