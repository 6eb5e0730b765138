"""What a routing decision hands the forwarder: pods ranked best first, what the
first costs, the pull hint, and the prompt's hashes as the request goes out."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvmarina.headers import PullHint
from kvmarina.router.hashmemo import PromptHashes
from kvmarina.router.pods import PodState

Scored = tuple[float, int, int, int, str]  # cost, inflight, rotation, index, pull peer


class Decision:
    """Pods ranked best first (the rest are the retry order) and what the first costs.

    ``prompt`` holds the prompt's block hashes as far as the decision needed them;
    ``hashes`` completes it (for ``record_sent``, once the request is on its way), and
    so does ``chain.all``, the forwarder's, which also tells the router that the
    attempt's pod computes the prompt now (``on_attempt``).
    A cache-aware decision ranks its pods when ``ranked`` is first read; ``first(k)``
    gives the same ``k`` pods without sorting them all.

    Invariant: ``ranked`` is non-empty; ``pull`` (if any) applies to ``ranked[0]``."""

    __slots__ = (
        "_pods",
        "_ranked",
        "_scored",
        "attempt",
        "best",
        "cached_blocks",
        "chain",
        "computing_at",
        "est_ttft_s",
        "looked_up",
        "on_attempt",
        "prompt",
        "pull",
        "pulling",
    )

    def __init__(
        self,
        ranked: list[PodState],
        chain: PromptHashes,
        cached_blocks: dict[str, int],
        est_ttft_s: float,
        pull: PullHint | None = None,
        scored: list[Scored] | None = None,
        best: PodState | None = None,
    ) -> None:
        """``ranked``: the pods in order, or (with ``scored``) the pods ``scored`` indexes
        (``best`` is then the least of them)."""
        self.prompt = chain
        # what the forwarder reads: ``chain.all`` runs once the request is written to
        # the attempt's pod (``UpstreamPool.post``'s ``while_waiting``)
        self.chain = _Sending(self)
        self.cached_blocks = cached_blocks
        # only a scored decision looked the prompt up: the others know nothing of what
        # is cached, so their ``uncached_tokens`` is the whole prompt
        self.looked_up = scored is not None
        self.est_ttft_s = est_ttft_s
        self.pull = pull
        self._scored = scored
        self._pods = ranked
        self._ranked: list[PodState] | None = None if scored is not None else ranked
        self.best = best if best is not None else ranked[0]
        # the pod of the attempt under way (``uncached_tokens`` names it), and what
        # hears that it is computing the prompt (``RoutingCore._computing``)
        self.attempt: PodState | None = None
        self.pulling = 0  # blocks the attempt's pod pulls (``uncached_tokens`` sets it)
        self.on_attempt: Callable[[PodState, list[bytes]], float | None] | None = None
        # when ``on_attempt`` last noted the attempt's pod as computing the prompt
        self.computing_at: float | None = None

    @property
    def ranked(self) -> list[PodState]:
        if self._ranked is None:
            assert self._scored is not None
            self._scored.sort()
            self._ranked = [self._pods[t[3]] for t in self._scored]
        return self._ranked

    def first(self, k: int) -> list[PodState]:
        """``ranked[:k]`` (a partial sort of many pods: C-level ``sort`` wins below ~64)."""
        if self._ranked is not None or self._scored is None or len(self._scored) < 64:
            return self.ranked[:k]
        return [self._pods[t[3]] for t in heapq.nsmallest(k, self._scored)]

    def runner_up_cost(self) -> float | None:
        """What the best pod but ``best`` cost (``None`` unless scored, of two or more)."""
        scored, best = self._scored, self.best
        if scored is None:
            return None
        return min((t[0] for t in scored if self._pods[t[3]] is not best), default=None)

    @property
    def hashes(self) -> list[bytes]:
        """Every full block's hash (computed on first use past what routing needed)."""
        return self.prompt.all()

    def uncached_tokens(self, pod: PodState, n_tokens: int, block_size: int) -> int:
        """What ``pod`` will prefill (the forwarder asks as an attempt on it starts:
        that attempt's pod, for ``chain``); ``pulling`` says how many blocks it pulls
        first."""
        self.attempt = pod
        cached = self.cached_blocks.get(pod.domain, 0)
        if pod.shared is not None:
            cached = max(cached, self.cached_blocks.get(pod.shared, 0))
        self.pulling = 0
        if self.pull is not None and pod is self.best and self.pull.blocks > cached:
            self.pulling = self.pull.blocks - cached
            cached = self.pull.blocks
        return max(0, n_tokens - cached * block_size)


class _Sending:
    """``Decision.chain`` as the forwarder uses it: ``all()`` (the prompt's hashes,
    computed while the pod works) runs once the request is written to the pod of
    the attempt under way, and tells the router so (``Decision.on_attempt``), once
    per attempt."""

    __slots__ = ("_d",)

    def __init__(self, decision: Decision) -> None:
        self._d = decision

    def all(self) -> list[bytes]:
        d = self._d
        hashes = d.prompt.all()
        if d.attempt is not None and d.on_attempt is not None:
            d.computing_at = d.on_attempt(d.attempt, hashes)
        d.attempt = None
        return hashes
