"""The scheduler's side of the connector: which blocks each step loads and saves.

Per request, ``Planner`` keeps the pool's hashes of its full blocks (the contract's
chain over its token ids, seeded by the model identity and the request's
``cache_salt``), how many leading blocks the agent holds, the vLLM block ids the
request was given, and what it has saved. Each step it turns vLLM's schedule into
``StepPlan``: blocks to copy from the agent's pages into vLLM's cache before the
forward pass (the agent's hits beyond vLLM's own prefix-cache hits) and blocks that
become full in this step, to save after it.

A lookup pins the blocks it found; they stay pinned until the step that loads them is
over (``step_done``), so the agent cannot reuse their pages while the worker reads
them. It also claims the blocks past them (``kvmarina.agent.node.claims``): another engine
of the node that gets the same prefix meanwhile learns that they are being computed
and waits for them (``matched`` answers ``None``: vLLM asks again next step) instead of
computing them a second time, at most ``PEER_WAIT_S``. The claims end as the worker
commits the blocks, or when the request is over and its saves are (``sends_done``).
Nothing here imports vLLM: ``vllm.py`` passes plain values in.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvmarina.agent.client import NO_HITS, Hits
from kvmarina.connector.agent_session import AgentSession
from kvmarina.hashing import HashContract

log = logging.getLogger("kvmarina.connector")

#: The longest a request waits for prompt blocks another engine of the node claimed
#: (as the reference engine's scheduler does): such a prefill is running, so they
#: normally land within one TTFT; a claimer this late is stuck, and vLLM computes them.
PEER_WAIT_S = 10.0
#: Asked again no sooner than this while waiting: an idle vLLM schedules in a tight loop.
ASK_EVERY_S = 0.002

NONE: tuple[Hits, int] = (NO_HITS, 0)  # nothing to look up


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What the worker does in one step: ``loads`` (vLLM block id, agent page, index)
    from the agent boot ``boot_id``; ``saves`` (request, vLLM block id, the block's
    hash); ``preempted``: requests vLLM preempted (their blocks freed) in this step."""

    loads: list[tuple[int, int, int]] = field(default_factory=list)
    saves: list[tuple[str, int, bytes]] = field(default_factory=list)
    boot_id: str | None = None
    preempted: frozenset[str] = frozenset()


@dataclass(slots=True)
class Tracked:
    """One request. Invariants: ``hashes`` are the chain over its first
    ``len(hashes)`` full blocks; ``saved <= len(hashes)``; ``pinned`` are hashes this
    side holds pinned in the agent for the request's pending load."""

    req_id: str
    tokens: Sequence[int]  # vLLM's live list of the request's token ids
    salt: str
    hashes: list[bytes] = field(default_factory=list)
    saved: int = 0
    block_ids: list[int] = field(default_factory=list)
    load: list[tuple[int, int, bytes]] = field(default_factory=list)  # (page, index, hash)
    load_from: int = 0  # the request's block index of ``load[0]``
    pinned: list[bytes] = field(default_factory=list)
    usable: int = 0  # the prompt's full blocks but the last token's: hashed and claimed


class Planner:
    def __init__(self, contract: HashContract, identity: str, session: AgentSession) -> None:
        self.contract, self.identity, self.session = contract, identity, session
        self.bs = contract.block_size
        self.requests: dict[str, Tracked] = {}
        # requests with a save ever planned: vLLM keeps their blocks when they finish
        # until the worker's saves are over (kept across a preemption's fresh start)
        self.saving: set[str] = set()
        self.waiting: dict[str, tuple[float, float]] = {}  # request -> (first, last) ask
        self._unclaim_after: dict[str, list[bytes]] = {}  # until the request's saves are over
        self._unpin: deque[list[bytes]] = deque()  # per step in flight, oldest first
        self.loaded_blocks = 0
        self.saved_blocks = 0

    # -- hashes ---------------------------------------------------------------------
    def _extend(self, r: Tracked, full: int) -> None:
        """Hash the request's blocks up to ``full`` (continuing the chain)."""
        have = len(r.hashes)
        if full <= have:
            return
        tokens = list(r.tokens[have * self.bs : full * self.bs])
        if have:
            r.hashes += self.contract.block_hashes(tokens, "", parent=r.hashes[-1])
        else:
            r.hashes += self.contract.block_hashes(tokens, self.identity, r.salt)

    # -- admission: how much the agent can give ----------------------------------------
    def matched(
        self, req_id: str, tokens: Sequence[int], salt: str, local_tokens: int
    ) -> int | None:
        """Tokens beyond vLLM's own ``local_tokens`` hits that the agent holds (pinned
        for the load), or ``None`` while another engine of the node computes the blocks
        after them. At least the last prompt token is left to compute, as vLLM needs;
        a repeated call (the request could not be scheduled) starts over."""
        r = self.requests.get(req_id)
        if r is not None:
            self._drop_pins(r)
        now = time.monotonic()
        first, last = self.waiting.get(req_id, (now, 0.0))
        if now - last < ASK_EVERY_S:
            return None
        r = self.requests[req_id] = Tracked(req_id, tokens, salt)
        r.usable = max(0, (len(tokens) - 1) // self.bs)
        self._extend(r, r.usable)
        hits, pending = self.session.lookup_claim(r.hashes[: r.usable]) if r.usable else NONE
        r.pinned = list(hits.hashes)
        if pending and self._wait(req_id, first, now, pending):
            self._drop_pins(r)
            return None
        self.waiting.pop(req_id, None)
        r.saved = len(hits)
        local = local_tokens // self.bs
        if len(hits) <= local:
            self._drop_pins(r)
            return 0
        rest = hits[local:]
        r.load = list(zip(rest.pages, rest.indices, rest.hashes, strict=True))
        r.load_from = local
        return len(r.load) * self.bs

    def _wait(self, req_id: str, first: float, now: float, pending: int) -> bool:
        """Whether the request waits another step for ``pending`` claimed blocks."""
        if now - first < PEER_WAIT_S:
            self.waiting[req_id] = (first, now)
            return True
        self.waiting.pop(req_id, None)
        log.warning(
            "kvmarina connector: request %s waited %gs for %d blocks another engine "
            "claimed; computing them", req_id, PEER_WAIT_S, pending,
        )  # fmt: skip
        return False

    def allocated(self, req_id: str, block_ids: Sequence[int], external_tokens: int) -> None:
        """vLLM gave the request ``block_ids``; ``external_tokens`` are to be loaded."""
        r = self.requests.get(req_id)
        if r is None:
            return
        r.block_ids = list(block_ids)
        if external_tokens == 0:
            r.load = []
            self._drop_pins(r)

    # -- each step --------------------------------------------------------------------
    def step(
        self,
        new: Sequence[tuple[str, Sequence[int], int]],
        cached: Sequence[tuple[str, Sequence[int] | None, int, bool]],
        scheduled: dict[str, int],
        preempted: frozenset[str] = frozenset(),
    ) -> StepPlan:
        """``new``: (request, block ids, computed tokens) of requests scheduled for the
        first time; ``cached``: (request, new block ids, computed tokens, resumed) of
        the others; ``scheduled``: tokens each computes in this step; ``preempted``:
        requests whose blocks vLLM freed in this step."""
        plan = StepPlan(boot_id=self.session.boot_id, preempted=preempted)
        pins: list[bytes] = []
        for req_id, block_ids, computed in new:
            r = self.requests.get(req_id)
            if r is None:
                continue
            r.block_ids = list(block_ids)
            self._loads(r, plan, pins)
            self._saves(r, computed + scheduled.get(req_id, 0), plan)
        for req_id, new_ids, computed, resumed in cached:
            r = self.requests.get(req_id)
            if r is None:
                continue
            if resumed:  # preempted and back: its blocks are all new (what it saved stays)
                r.block_ids = list(new_ids or [])
            elif new_ids:
                r.block_ids += list(new_ids)
            self._saves(r, computed + scheduled.get(req_id, 0), plan)
        self._unpin.append(pins)
        return plan

    def _loads(self, r: Tracked, plan: StepPlan, pins: list[bytes]) -> None:
        for k, (page, index, h) in enumerate(r.load):
            plan.loads.append((r.block_ids[r.load_from + k], page, index))
            pins.append(h)
        self.loaded_blocks += len(r.load)
        r.load, r.pinned = [], []

    def _saves(self, r: Tracked, computed: int, plan: StepPlan) -> None:
        full = min(computed, len(r.tokens)) // self.bs
        if full <= r.saved:
            return
        self._extend(r, full)
        for j in range(r.saved, min(full, len(r.block_ids))):
            plan.saves.append((r.req_id, r.block_ids[j], r.hashes[j]))
            self.saving.add(r.req_id)
        self.saved_blocks += max(0, min(full, len(r.block_ids)) - r.saved)
        r.saved = full

    def step_done(self) -> None:
        """The oldest step in flight is over: the blocks it loaded may be unpinned."""
        if self._unpin:
            self.session.release(self._unpin.popleft())

    def finished(self, req_id: str) -> bool:
        """Forget the request; True when the worker may still be saving its blocks
        (vLLM must keep them until the worker says the saves are over). Its claims on
        blocks it will not save end now; on the ones it saves, when the saves are over
        (committed blocks have none left; a save that failed leaves one)."""
        self.waiting.pop(req_id, None)
        saving = req_id in self.saving
        self.saving.discard(req_id)
        r = self.requests.pop(req_id, None)
        if r is None:
            return saving
        claimed = r.hashes[: r.usable]
        if saving:
            self._unclaim_after[req_id] = claimed[: r.saved]
            claimed = claimed[r.saved :]  # never saved: given up now
        # its pins and its claims go back in one call (this runs in vLLM's scheduler loop)
        self.session.release(r.pinned, unclaim=claimed)
        r.pinned, r.load = [], []
        return saving

    def sends_done(self, req_ids: Iterable[str]) -> None:
        """The worker's saves of these (finished) requests are over."""
        unclaim = [h for r in req_ids for h in self._unclaim_after.pop(r, ())]
        if unclaim:
            self.session.release([], unclaim=unclaim)

    def _drop_pins(self, r: Tracked) -> None:
        if r.pinned:
            self.session.release(r.pinned)
        r.pinned, r.load = [], []
