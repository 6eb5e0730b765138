"""Continuous batching with chunked prefill, on a thread of its own.

Each step takes every running sequence's next decode token plus prefill chunks
of admitted prompts, up to a token budget, and runs one forward pass over the
lot. New requests join the running batch at the next step; a long prompt is
cut into chunks so running decodes keep moving. The model runs off the event
loop (this is CPU-heavy work); results go back through each request's ``emit``
callback, which the server makes thread-safe.

Admission reserves KV room for the whole request (prompt + max_tokens), so a
running sequence never runs out of room mid-decode; a request that cannot be
admitted yet waits, and beyond ``max_waiting`` waiting requests ``submit``
refuses with ``QueueFull`` (the server answers 429 with Retry-After).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvmarina.engine.batch import StepBatch
from kvmarina.engine.kvstore import KVFull, KVStore
from kvmarina.engine.model import LlamaForCausalLM
from kvmarina.engine.sampling import Sampler, SamplingParams
from kvmarina.headers import PullHint

#: How long a step with nothing to compute sleeps: every waiting request is held
#: by the agent (KV full) or waits for blocks another engine is computing, and
#: each waiting step asks the agent again.
IDLE_S = 0.005
#: The longest a sequence waits for prompt blocks another engine of the node is
#: computing (the agent's claims). Such a prefill is running, so its blocks
#: normally land within one TTFT; a claimer this late is stuck without having
#: dropped its connection, and the sequence computes the blocks itself.
PEER_WAIT_S = 10.0

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting; retry later."""


@dataclass(slots=True)
class Output:
    """One scheduler event for a request: a token and/or the end."""

    token: int | None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler sees it.

    Invariant: ``computed <= len(prompt) + len(output)``; the KV of
    ``(prompt + output)[:computed]`` is in the store.
    """

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    salt: str = ""
    pull: PullHint | None = None
    seq_id: int = 0
    cached_len: int = 0
    computed: int = 0
    output: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: bool = False
    waited_out: bool = False  # waited PEER_WAIT_S for another engine's blocks
    admitted_at_step: int = -1
    sampler: Sampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    def tokens(self) -> list[int]:
        return self.prompt + self.output


def _left(seq: Sequence | None) -> int:
    """Prompt tokens still to compute."""
    return 0 if seq is None else len(seq.prompt) - seq.computed


@dataclass
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        model: LlamaForCausalLM,
        store: KVStore,
        *,
        eos_id: int | None,
        max_batch: int = 32,
        max_waiting: int = 256,
        step_tokens: int = 512,
        max_model_len: int = 4096,
        on_step: Callable[[SchedulerStats], None] | None = None,
    ) -> None:
        self.model, self.store, self.eos_id = model, store, eos_id
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.step_tokens, self.max_model_len = step_tokens, max_model_len
        self.on_step = on_step
        self.stats = SchedulerStats()
        self._ticks = 0  # step() calls, with or without a forward pass
        self._ids = itertools.count(1)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._reported: tuple[int, int] | None = None  # (running, waiting) last reported
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public API

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvmarina-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> int:
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            seq.seq_id = next(self._ids)
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq.seq_id

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # picked up at the next step boundary
        with self._cv:
            self._cv.notify_all()

    def fail_all(self, reason: str) -> None:
        """End every request with an error (e.g. the agent went away)."""
        with self._cv:
            for seq in list(self._waiting) + self._running:
                seq.cancelled = True
                seq.emit(Output(None, "error", reason))
            self._cv.notify_all()

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # keep serving: fail the batch, not the engine
                log.exception("engine step failed; failing the running requests")
                for seq in self._running:
                    seq.emit(Output(None, "error", "internal error in the engine step"))
                    self._close(seq)
                self._running.clear()

    def step(self) -> None:
        poll = getattr(self.store, "poll", None)
        if poll is not None:
            poll()  # the agent may ask for reserved-but-unused blocks back
        self._drop_cancelled()
        self._admit()
        self._report_load()  # before a step that may take a while: who was just admitted
        if not self._running:
            time.sleep(IDLE_S)  # waiting requests cannot be admitted yet (KV full)
            return
        batch, tokens, seqs = self._build_batch()
        self._ticks += 1
        if not seqs:
            time.sleep(IDLE_S)  # every running sequence waits for blocks in flight
            return
        logits = self.model(
            torch.tensor(tokens, dtype=torch.int64),
            batch.positions(),
            self.store.attention(batch),
            batch.last_rows(),
        )
        for row, (seq, n) in enumerate(zip(seqs, batch.new_lens, strict=True)):
            seq.computed += n
            self.store.commit(seq.seq_id, seq.tokens()[: seq.computed])
            if not seq.prefilling:
                self._emit_next(seq, logits[row])
        self.stats.steps += 1
        self._publish_stats()

    # ------------------------------------------------------------ helpers

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._running.remove(seq)
            self._close(seq)
        with self._cv:
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    return
                seq = self._waiting[0]
            budget = min(len(seq.prompt) + seq.params.max_tokens, self.max_model_len)
            try:
                seq.cached_len = self.store.open(seq.seq_id, seq.prompt, seq.salt, seq.pull)
                self.store.reserve(seq.seq_id, budget)
            except KVFull:
                self.store.close(seq.seq_id)
                if not self._running:
                    seq.emit(Output(None, "error", "the request does not fit in the KV budget"))
                    with self._cv:
                        self._waiting.popleft()
                return
            except Exception as exc:  # the KV store is unusable (e.g. no agent): fail this one
                log.warning("cannot admit request %d: %s", seq.seq_id, exc)
                seq.emit(Output(None, "error", f"KV cache unavailable: {exc}"))
                with self._cv:
                    self._waiting.popleft()
                continue
            with self._cv:
                self._waiting.popleft()
            seq.computed = seq.cached_len
            seq.admitted_at_step = self._ticks
            self.stats.prompt_tokens += len(seq.prompt)
            self.stats.cached_prompt_tokens += seq.cached_len
            self._running.append(seq)

    def _build_batch(self) -> tuple[StepBatch, list[int], list[Sequence]]:
        ids, cached, new, tokens, seqs = [], [], [], [], []
        budget = self.step_tokens
        # decodes first: one token each, so they never starve behind a prefill
        for seq in list(self._running):
            if not seq.prefilling and not self._grow(seq, seq.computed + 1):
                continue
            if not seq.prefilling:
                ids.append(seq.seq_id)
                cached.append(seq.computed)
                new.append(1)
                tokens.append(seq.output[-1])
                seqs.append(seq)
                budget -= 1
        ready = self._ready_prefills() if budget > 0 else []
        oldest = min(ready, key=lambda s: s.seq_id, default=None)
        # the oldest prefill keeps part of every step: short prompts arriving all
        # the time never starve a long one
        reserve = min(self.step_tokens // 4, _left(oldest)) if len(ready) > 1 else 0
        for seq in sorted(ready, key=_left):
            if seq is oldest:
                reserve = 0
            if budget - reserve <= 0:
                continue
            n = min(_left(seq), budget - reserve)
            if not self._grow(seq, seq.computed + n):
                continue
            ids.append(seq.seq_id)
            cached.append(seq.computed)
            new.append(n)
            tokens.extend(seq.prompt[seq.computed : seq.computed + n])
            seqs.append(seq)
            budget -= n
        return StepBatch(tuple(ids), tuple(cached), tuple(new)), tokens, seqs

    def _ready_prefills(self) -> list[Sequence]:
        """Prefilling sequences that may compute now: blocks committed meanwhile are
        adopted first, and one whose next block another sequence is computing waits.
        The step then takes the shortest remaining prefill first: a follow-up turn's
        few new tokens would otherwise wait behind another prompt's long prefill,
        chunk after chunk, for a first token that needs one step."""
        ready = []
        for seq in self._running:
            if seq.prefilling:
                self._adopt(seq)
                if not self._behind(seq):
                    ready.append(seq)
        return ready

    def _adopt(self, seq: Sequence) -> None:
        """Prompt blocks another sequence committed meanwhile count as cached."""
        adopt = getattr(self.store, "adopt", None)
        if adopt is None or seq.admitted_at_step == self._ticks:
            return  # admitted this step: its lookup has just run
        done = adopt(seq.seq_id, seq.computed, len(seq.prompt))
        if done > seq.computed:
            self.stats.cached_prompt_tokens += done - seq.computed
            seq.cached_len += done - seq.computed
            seq.computed = done

    def _behind(self, seq: Sequence) -> bool:
        """Another sequence (an earlier one of this engine, or one of another engine
        on the node, as the agent's claims say) is computing this one's next prompt
        block: wait, and adopt it once committed. Only while nothing was computed
        yet, and for another engine's blocks at most ``PEER_WAIT_S``."""
        behind = getattr(self.store, "behind", None)
        if behind is None or seq.computed != seq.cached_len:
            return False  # a store that cannot adopt blocks gains nothing by waiting
        peer = getattr(self.store, "peer_computing", None)
        if not seq.waited_out and peer is not None and peer(seq.seq_id):
            if time.perf_counter() - seq.arrival < PEER_WAIT_S:
                return True
            seq.waited_out = True
            log.warning(
                "sequence %d waited %gs for blocks another engine claimed; computing them",
                seq.seq_id,
                PEER_WAIT_S,
            )
        return bool(behind(seq.seq_id))

    def _grow(self, seq: Sequence, total_tokens: int) -> bool:
        """Room for ``total_tokens`` (a no-op unless reserved blocks were given back under
        pressure). A sequence that cannot get it back ends with 'length', cleanly."""
        try:
            self.store.reserve(seq.seq_id, total_tokens)
            return True
        except KVFull:
            log.warning("sequence %d cannot grow under KV pressure; ending it", seq.seq_id)
            seq.emit(Output(None, "length"))
            self._running.remove(seq)
            self._close(seq)
            return False

    def _emit_next(self, seq: Sequence, logits: torch.Tensor) -> None:
        token = seq.sampler.next_token(logits)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.output.append(token)
        self.stats.generated_tokens += 1
        reason = None
        if token == self.eos_id and not seq.params.ignore_eos:
            reason = "stop"
        elif (
            len(seq.output) >= seq.params.max_tokens
            or len(seq.prompt) + len(seq.output) >= self.max_model_len
        ):
            reason = "length"
        seq.emit(Output(token, reason))
        if reason is not None:
            self._running.remove(seq)
            self._close(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence from outside the token loop (a stop string matched)."""
        seq.cancelled = True
        seq.emit(Output(None, reason))

    def _close(self, seq: Sequence) -> None:
        try:
            self.store.close(seq.seq_id)
        except Exception:
            log.exception("closing sequence %d failed", seq.seq_id)

    def _publish_stats(self) -> None:
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting)
        self._report_load()
        if self.on_step is not None:
            self.on_step(self.stats)

    def _report_load(self) -> None:
        """Tell the store's agent (and through it the routers) when the figures change;
        a failed report is only a router's loss of precision, never the engine's."""
        load = (len(self._running), len(self._waiting))
        if load == self._reported:
            return
        self._reported = load
        try:
            self.store.report_load(*load)
        except Exception as exc:
            log.debug("load report failed: %s", exc)
