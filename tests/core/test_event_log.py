"""The one block-event publisher (``kvmarina.event_log``), as the agent and the simulated
engine stream it: the snapshot first, then events as frames, until the log is closed."""

from __future__ import annotations

import asyncio

from kvmarina.event_log import EventLog, stream
from kvmarina.events import BlockEvent, LoadRecord, Resync, Snapshot, from_wire
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


async def test_what_one_turn_publishes_goes_out_in_one_write_with_each_pods_last_load() -> None:
    """A prefill's end publishes its stored and evicted blocks and a load report: the
    stream writes them together, and a report that a later one for the same pod
    replaces is not sent at all (another pod's is)."""
    log = EventLog("n", dict)
    writes: list[bytes] = []

    async def write(frame: bytes) -> None:
        writes.append(frame)

    task = asyncio.create_task(stream(log, write))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(writes) == 1  # the snapshot
    log.publish_load(LoadRecord("a", running=1, waiting=2))
    log.publish("stored", [b"\x02" * 16], "device")
    log.publish_load(LoadRecord("b", running=4, waiting=0))
    log.publish("evicted", (b"\x02" * 16,))
    log.publish_load(LoadRecord("a", running=1, waiting=1))
    for _ in range(3):
        await asyncio.sleep(0)
    log.close()
    await asyncio.wait_for(task, 5)
    assert len(writes) == 2
    decoder = FrameDecoder()
    decoder.feed(writes[1])
    records = [from_wire(obj) for obj in decoder.frames()]
    assert [(type(r).__name__, getattr(r, "pod", None)) for r in records] == [
        ("BlockEvent", None),
        ("LoadRecord", "b"),
        ("BlockEvent", None),
        ("LoadRecord", "a"),
    ]
    assert isinstance(records[3], LoadRecord) and records[3].waiting == 1


async def test_event_log_resyncs_a_slow_subscriber() -> None:
    log = EventLog("n", lambda: {b"\x01" * 16: "device"}, max_queue=3)
    sub = log.subscribe()
    for i in range(5):
        log.publish("stored", (bytes([i]) * 16,), "device")
    got = []
    while not sub.queue.empty():
        got.append(sub.queue.get_nowait())
    kinds = [type(r).__name__ for r in got]
    assert "Resync" in kinds
    after = got[kinds.index("Resync") + 1 :]
    assert isinstance(after[0], Snapshot)
    # after the snapshot, numbering continues with no gap
    seqs = [r.seq for r in after if isinstance(r, BlockEvent)]
    assert seqs == list(range(after[0].seq + 1, after[0].seq + 1 + len(seqs)))
    assert isinstance(got[kinds.index("Resync")], Resync)
    assert log.resyncs >= 1 and log.lag() == 0  # the subscriber took everything
    await asyncio.sleep(0)


def test_event_log_reports_lag_and_resyncs() -> None:
    log = EventLog("n", dict, max_queue=4)
    assert log.lag() == 0
    fast, slow = log.subscribe(), log.subscribe()
    for i in range(3):
        log.publish("stored", (bytes([i]) * 16,), "device")
    while not fast.queue.empty():
        fast.queue.get_nowait()
    assert log.lag() == 4 and log.resyncs == 0  # the slow one: snapshot + 3 events
    log.publish("stored", (b"\x09" * 16,), "device")
    assert log.resyncs == 1 and slow.resyncs == 1
    assert log.lag() == 2  # the slow one now holds a Resync marker and a snapshot
