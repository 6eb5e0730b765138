"""Reclaim under pressure and event-stream resync, against a real agent process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from kvmarina.agent.client import AgentClient, AgentFull
from kvmarina.events import BlockEvent, Resync, Snapshot, from_wire
from kvmarina.framing import FrameDecoder

from .conftest import agent_process
from .test_agent_process import run_writer

POOL_BLOCKS = 256  # the test agent: 64 pages of 4 blocks of 4096 bytes


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_full_pool_asks_holders_to_release_and_waits_a_bounded_time(tmp_path: Path) -> None:
    with agent_process(tmp_path, reclaim_timeout_s=1.0) as agent:
        # A holder pins every block of the node and answers reclaim requests.
        holder = run_writer(agent, "tok-chat", POOL_BLOCKS, "yield")
        stubborn = None
        try:
            assert agent.stats()["pages"]["device"]["used"] == 64  # type: ignore[index]
            other = AgentClient(agent.socket, "tok-code", 4096).connect()
            assert len(other.lease(8)) == 8  # granted once the holder released 8
            assert holder.stdout is not None and holder.stdout.readline().strip() == "RELEASED 8"
            assert agent.stats()["stats"]["reclaim_requests"] >= 1  # type: ignore[index]
            # The holder dies: its pins go, its blocks stay cached (evictable).
            _stop(holder)
            # A holder that never answers keeps what it leased; the asker gets a
            # clear "full" after the bounded wait, not a hang and not its blocks.
            stubborn = run_writer(agent, "tok-other", POOL_BLOCKS - 8, "lease-only")
            t0 = time.monotonic()
            with pytest.raises(AgentFull, match="asked 1 holder"):
                other.lease(1)
            assert time.monotonic() - t0 >= 0.9
            usage = agent.stats()["usage"]
            assert usage["team-b/other"] == POOL_BLOCKS - 8 and usage["team-a/code"] == 8  # type: ignore[index]
            other.close()
        finally:
            _stop(holder)
            if stubborn is not None:
                _stop(stubborn)


class Follower:
    """What a router does with the stream: apply records, refuse gaps."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, str] = {}
        self.seq: int | None = None  # None: waiting for a snapshot
        self.resyncs = 0
        self.snapshots = 0

    def apply(self, rec: BlockEvent | Snapshot | Resync) -> None:
        if isinstance(rec, Resync):
            self.resyncs += 1
            self.seq = None
        elif isinstance(rec, Snapshot):
            self.blocks, self.seq = dict(rec.blocks), rec.seq
            self.snapshots += 1
        else:
            assert self.seq is not None, "an event before the snapshot"
            assert rec.seq == self.seq + 1, f"a gap: {self.seq} -> {rec.seq}"
            self.seq = rec.seq
            for h in rec.hashes:
                if rec.type == "evicted":
                    self.blocks.pop(h, None)
                else:
                    self.blocks[h] = rec.tier or ""


async def test_a_subscriber_that_falls_behind_is_resynchronized_without_a_gap(
    tmp_path: Path,
) -> None:
    with agent_process(tmp_path, event_queue=4) as agent:
        # Fill the node with cached (unpinned) blocks: one commit, one event.
        await asyncio.to_thread(lambda: run_writer(agent, "tok-chat", POOL_BLOCKS, "exit").wait(30))
        async with aiohttp.ClientSession() as s, s.get(agent.url + "/v1/events") as resp:
            dec, follower = FrameDecoder(), Follower()

            async def follow_until(done: Callable[[], bool]) -> None:
                while not done():
                    dec.feed(await resp.content.readany())
                    for frame in dec.frames():
                        follower.apply(from_wire(frame))

            await asyncio.wait_for(follow_until(lambda: follower.snapshots == 1), 10)
            assert len(follower.blocks) == POOL_BLOCKS
            # Leasing 20 slots evicts 20 blocks within one loop turn: 20 events,
            # far past this subscriber's queue of 4.
            other = AgentClient(agent.socket, "tok-code", 4096).connect()
            await asyncio.to_thread(other.lease, 20)
            await asyncio.wait_for(
                follow_until(lambda: len(follower.blocks) == POOL_BLOCKS - 20), 10
            )
            assert follower.resyncs >= 1 and follower.snapshots >= 2
            cached = {
                bytes([i + 1]) * 16 if i < 255 else (i + 1).to_bytes(16, "big")
                for i in range(POOL_BLOCKS)
            }
            assert set(follower.blocks) < cached
            other.close()


def test_host_tier_round_trip_across_processes(tmp_path: Path) -> None:
    # 2 device pages (8 blocks) and 2 host pages: a second batch of 8 blocks pushes
    # the first batch down to host memory; a lookup brings it back, bytes intact.
    with agent_process(tmp_path, device_bytes=2 * 4 * 4096, host_bytes=2 * 4 * 4096) as agent:
        first = run_writer(agent, "tok-chat", 8, "exit")
        first.wait(10)
        second = AgentClient(agent.socket, "tok-code", 4096).connect()
        items = [(p, i, bytes([0xA0 + k]) * 16) for k, (p, i) in enumerate(second.lease(8))]
        second.commit(items)
        second.release([h for _, _, h in items])
        assert agent.stats()["blocks"] == {"device": 8, "host": 8}
        hashes = [bytes([i + 1]) * 16 for i in range(8)]
        hits = second.lookup(hashes)
        assert [h.hash for h in hits] == hashes and {h.tier for h in hits} == {"device"}
        for i, hit in enumerate(hits):
            view = second.block(hit.page, hit.index)
            assert int(view.min()) == int(view.max()) == i + 1
        stats = agent.stats()["stats"]
        assert stats["offloaded"] >= 8 and stats["promoted"] == 8  # type: ignore[index]
        second.close()


def test_reclaim_requests_reach_a_busy_client_between_its_calls(tmp_path: Path) -> None:
    """No watcher thread: the push arrives while the holder waits for a reply to
    its own call; it is set aside, and handled once that call returns."""
    with agent_process(tmp_path, reclaim_timeout_s=10.0) as agent:
        holder = AgentClient(agent.socket, "tok-chat", 4096).connect()
        leased = holder.lease(POOL_BLOCKS)
        asked: list[int] = []

        def on_reclaim(n: int) -> None:
            asked.append(n)
            holder.release([], leased[-n:])

        holder.watch(on_reclaim, background=False)
        other = AgentClient(agent.socket, "tok-code", 4096).connect()
        got: list[list[tuple[int, int]]] = []
        waiter = threading.Thread(target=lambda: got.append(other.lease(4)))
        waiter.start()
        deadline = time.monotonic() + 10
        while not agent.stats()["stats"].get("reclaim_requests"):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert holder.ping()  # the reply comes after the pushed request
        assert asked == [4]
        waiter.join(10)
        assert len(got) == 1 and len(got[0]) == 4
        assert holder.poll() == 0  # nothing else pending
        holder.close()
        other.close()
