"""Following one vLLM pod's KV-event stream (ZMQ PUB) and its replay service (ZMQ ROUTER).

* A SUB socket (every topic) follows the publisher; a socket monitor says when the TCP
  connection comes up or goes down.
* On every (re)connection the pod's blocks are forgotten and the publisher's buffer is
  replayed from sequence 0 (vLLM keeps its last ``buffer_steps`` batches): a reconnect
  may reach a restarted vLLM whose numbering began again, and the replay rebuilds what
  the pod holds (``partial`` when the buffer no longer reaches back to its start).
* Live batches are applied in sequence order. A gap asks the replay service for the
  missing batches; when it cannot give them all, the pod's blocks are forgotten and
  following goes on from there (a resync).
* The pod's index is ``live`` (trusted by the routing core) while the connection is up,
  following started from a known point, no unreadable batch or foreign block size came
  in the last ``suspect_s`` seconds, and the pod is not silent: a pod sent new full
  blocks publishes their ``BlockStored`` within ``silent_s``. When not live, routing
  falls back to the router's own record for the pod. Each problem is logged once per
  episode and counted in ``errors`` by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import zmq
import zmq.asyncio

from kvmarina.router.vllm_events import EventFormatError, PodBlocks, decode_batch

log = logging.getLogger("kvmarina.router.vllm")
END_SEQ = (-1).to_bytes(8, "big", signed=True)

Batch = tuple[int, bytes]  # (sequence number, msgpack payload)


class VLLMFollower:
    """One vLLM pod's events into ``blocks``; ``on_live(domain, live)`` on each change.

    Invariant: ``last_seq`` is the last batch applied to ``blocks`` since the last
    ``blocks.clear()``, or ``None`` when following must start over (replay from 0)."""

    def __init__(
        self,
        pod: str,
        events_url: str,
        replay_url: str | None,
        blocks: PodBlocks,
        on_live: Callable[[str, bool], None],
        *,
        connect_grace_s: float = 10.0,
        suspect_s: float = 30.0,
        silent_s: float = 15.0,
        replay_timeout_s: float = 2.0,
    ) -> None:
        self.pod, self.events_url, self.replay_url = pod, events_url, replay_url
        self.blocks, self.on_live = blocks, on_live
        self.connect_grace_s, self.suspect_s = connect_grace_s, suspect_s
        self.silent_s, self.replay_timeout_s = silent_s, replay_timeout_s
        self.connected = False
        self.live = False
        self.partial = False
        self.last_seq: int | None = None
        self.last_ts: float | None = None
        self.lag_s: float | None = None
        self.batches = 0
        self.gaps = 0
        self.resyncs = 0
        self.errors: Counter[str] = Counter()
        self._since = time.monotonic()  # start of the current disconnected stretch
        self._suspect_until = 0.0
        self._expect_by: float | None = None
        self._take_next = False
        self._warned: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._ctx = zmq.asyncio.Context.instance()

    @property
    def domain(self) -> str:
        return self.blocks.domain

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"vllm-events-{self.pod}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._set_live(False)

    def expect(self) -> None:
        """The pod was just sent full blocks it does not hold: their events are due."""
        if self._expect_by is None and self.live:
            self._expect_by = time.monotonic() + self.silent_s

    def forget(self, why: str) -> None:
        """Drop what the pod holds (it failed its health check): follow it anew."""
        if self.last_seq is not None or len(self.blocks):
            log.info("vllm pod %s: %s; its blocks are forgotten", self.pod, why)
        self.blocks.clear()
        self.last_seq = None
        self._evaluate()

    async def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.events_url)
        try:
            await asyncio.gather(self._watch(monitor), self._consume(sub), self._tick())
        finally:
            sub.disable_monitor()
            monitor.close(0)
            sub.close(0)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
                self.last_seq = None  # a reconnect may reach a restarted vLLM: start over
                self._recovered("unreachable")
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self._since = time.monotonic()
            self._evaluate()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._evaluate()

    # -- the stream ----------------------------------------------------------------
    async def _consume(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            if self.connected and self.last_seq is None:
                await self._sync_from_start()
            if not await sub.poll(250):
                continue
            frames = await sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self._problem("garbage", f"a message of {len(frames)} parts is not a KV batch")
                continue
            seq = int.from_bytes(frames[1], "big")
            if self.last_seq is None:
                await self._sync_from_start()
            assert self.last_seq is not None
            if self._take_next:  # no replay to start from: follow from this batch on
                self._take_next = False
                self.last_seq = max(self.last_seq, seq - 1)
            if seq <= self.last_seq:
                continue  # already applied from a replay
            if seq > self.last_seq + 1:
                await self._fill_gap(seq)
            self._apply(seq, frames[2])

    async def _sync_from_start(self) -> None:
        """Forget the pod's blocks and rebuild them from the publisher's buffer."""
        self.blocks.clear()
        self.last_seq = -1
        replayed = await self._replay(0)
        if replayed is None:
            self._set_partial("its replay service did not answer")
            self._take_next = True
            return
        if replayed and replayed[0][0] > 0:
            self._set_partial(f"its replay buffer starts at batch {replayed[0][0]}")
            self.last_seq = replayed[0][0] - 1
        else:
            self.partial = False
        for seq, payload in replayed:
            if seq == self.last_seq + 1:
                self._apply(seq, payload)
        self._evaluate()

    async def _fill_gap(self, seq: int) -> None:
        assert self.last_seq is not None
        self.gaps += 1
        missing = await self._replay(self.last_seq + 1) or []
        for s, payload in missing:
            if s == self.last_seq + 1 and s < seq:
                self._apply(s, payload)
        if self.last_seq + 1 < seq:
            self.resyncs += 1
            log.info(
                "vllm pod %s: batches %d..%d were lost and cannot be replayed; its index "
                "starts over from batch %d",
                self.pod, self.last_seq + 1, seq - 1, seq,
            )  # fmt: skip
            self.blocks.clear()
            self.last_seq = seq - 1

    def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        try:
            ts, events = decode_batch(payload)
            self.blocks.apply(events)
        except EventFormatError as exc:
            self._problem(exc.reason, str(exc))
            return
        self.batches += 1
        self.last_ts, self.lag_s = ts, max(0.0, time.time() - ts)
        self._expect_by = None
        for reason in ("garbage", "block_size", "silent"):
            self._recovered(reason)
        self._evaluate()

    async def _replay(self, start: int) -> list[Batch] | None:
        """Batches from ``start`` that the replay service still holds; ``None`` when
        there is no replay service or it did not answer in time."""
        if self.replay_url is None:
            return None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_url)
        out: list[Batch] = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(int(self.replay_timeout_s * 1000)):
                    return None
                frames = await dealer.recv_multipart()
                if len(frames) == 4 and frames[2] == END_SEQ:
                    return out
                if len(frames) == 4 and len(frames[2]) == 8:
                    out.append((int.from_bytes(frames[2], "big"), frames[3]))
        finally:
            dealer.close(0)

    # -- health ---------------------------------------------------------------------
    def _problem(self, reason: str, message: str) -> None:
        """An unreadable batch or foreign block size: the index cannot be trusted."""
        self.errors[reason] += 1
        self.blocks.clear()
        self._suspect_until = time.monotonic() + self.suspect_s
        self._warn(
            reason,
            f"vllm pod {self.pod}: {message}; routing it from the router's own record "
            f"until its events can be read again",
        )
        self._evaluate()

    def _warn(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("%s", message)

    def _recovered(self, reason: str) -> None:
        if reason in self._warned:
            self._warned.discard(reason)
            log.info("vllm pod %s: KV events are readable again (%s over)", self.pod, reason)

    def _set_partial(self, why: str) -> None:
        self.partial = True
        log.info("vllm pod %s: %s; its index holds only what it publishes from now", self.pod, why)

    def _evaluate(self) -> None:
        now = time.monotonic()
        if not self.connected and now - self._since > self.connect_grace_s:
            if "unreachable" not in self._warned:
                self.errors["unreachable"] += 1
            self._warn(
                "unreachable",
                f"vllm pod {self.pod}: no KV-event publisher answers at {self.events_url}; "
                "routing it from the router's own record",
            )
        if self._expect_by is not None and now > self._expect_by:
            if "silent" not in self._warned:
                self.errors["silent"] += 1
            self._warn(
                "silent",
                f"vllm pod {self.pod}: sent new blocks but published no KV events for "
                f"{self.silent_s:g} s; routing it from the router's own record",
            )
            self._expect_by = None
        self._set_live(
            self.connected
            and self.last_seq is not None
            and now >= self._suspect_until
            and "silent" not in self._warned
        )

    def _set_live(self, live: bool) -> None:
        if live != self.live:
            self.live = live
            self.on_live(self.domain, live)

    def health(self) -> dict[str, object]:
        """The pod's event health, as ``/health`` and ``/metrics`` report it."""
        return {
            "connected": self.connected,
            "live": self.live,
            "partial": self.partial,
            "last_seq": self.last_seq,
            "lag_s": None if self.lag_s is None else round(self.lag_s, 4),
            "batches": self.batches,
            "gaps": self.gaps,
            "resyncs": self.resyncs,
            "blocks": len(self.blocks),
            "orphans": self.blocks.orphans,
            "errors": dict(self.errors),
        }
