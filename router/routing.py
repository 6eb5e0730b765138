"""Choosing a pod: hash the prompt, look its prefix up, score the candidates.

Cache-aware scoring (docs/design.md "Routing") estimates each pod's time to first token::

    ttft = w_queue   * queue_ahead / rate                (prefill not yet done on the pod)
         + w_prefill * uncached_tokens / rate          (device-tier hits are free)
         +             host_hit_tokens / host_load_rate (host-tier hits cost a load)
         + min(w_prefill * recompute, w_migration * pull) of the blocks a peer node
           holds beyond this node's run (pull = bytes / transfer bandwidth)
         + w_duplication * recompute of those same blocks: leaving the node that holds
           a prefix copies it here, and under capacity pressure every copy evicts other
           useful blocks (on the Mooncake replay, 2.0 lifted the hit rate from 0.19 to
           0.21 at the same TTFT)
         + w_inflight * recompute of blocks a sibling engine is computing right now:
           the engine waits for them (the agent's claims say which) and uses them
           instead of computing them twice
         + w_sibling * recompute of the node's run beyond what this pod was sent: a
           sibling engine reads the node's blocks too, a little slower than the
           engine that computed them (the queue term still moves a request to an
           idle sibling; a busy engine's users spread, an idle one keeps its own)

and takes the minimum, ties broken by load. When the pull is the cheaper path the
decision carries a ``PullHint`` for the ``x-kvmarina-pull`` header.

The prefix lookup reads the event-fed index for nodes whose agent stream is live,
and the router's own record of where it sent each prefix (the approximate index)
for the others; ``mode`` says which of the two is in use.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmarina.headers import PullHint
from kvmarina.router.config import RouterConfig
from kvmarina.router.hashmemo import HashMemo
from kvmarina.router.index import DEVICE, BlockIndex, PrefixMatch
from kvmarina.router.pods import PodState

RECENT_S = 2.0


def pod_domain(pod: str) -> str:
    """The cache domain of an engine that keeps its KV to itself (no DNS name of a
    node contains '/', so it never names a node)."""
    return f"pod/{pod}"


class NoPodAvailable(RuntimeError):
    """Every pod is unhealthy or has an open breaker."""


@dataclass(slots=True)
class Decision:
    """Pods ranked best first (the rest are the retry order) and what the first costs.

    Invariant: ``ranked`` is non-empty; ``pull`` (if any) applies to ``ranked[0]``."""

    ranked: list[PodState]
    hashes: list[bytes]
    cached_blocks: dict[str, int]
    est_ttft_s: float
    pull: PullHint | None = None

    def uncached_tokens(self, pod: PodState, n_tokens: int, block_size: int) -> int:
        cached = self.cached_blocks.get(pod.domain, 0)
        if pod.shared is not None:
            cached = max(cached, self.cached_blocks.get(pod.shared, 0))
        if self.pull is not None and pod is self.ranked[0]:
            cached = max(cached, self.pull.blocks)
        return max(0, n_tokens - cached * block_size)


class RoutingCore:
    """Indexes, pods and policy: everything a decision needs, no I/O.

    Indexes are keyed by cache *domain* (``PodState.domain``): a node, whose agent's
    stream feeds it, or a vLLM pod (``pod/<name>``), whose own KV events feed it.

    Invariants: ``pods`` mirrors ``cfg.pods`` by name; ``live_nodes`` are the domains
    whose event stream is current (an agent's snapshot and events, or a vLLM pod's
    events followed from a known start)."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.contract = cfg.contract
        self.memo = HashMemo(cfg.contract, cfg.model_identity)
        self.index = BlockIndex(cfg.limits.index_max_blocks)
        self.approx = BlockIndex(cfg.limits.index_max_blocks)
        # prefixes sent in the last RECENT_S seconds, per pod: events confirm a prefix
        # only after its prefill, so a burst of requests sharing a new prefix would
        # scatter without it; and until then only that pod's engine has it (a sibling
        # on its node would compute it a second time)
        self.recent = BlockIndex(cfg.limits.index_max_blocks)
        self._recent_log: deque[tuple[float, str, Sequence[bytes]]] = deque()
        # prefixes sent to each pod, kept by LRU (not by time): which engine of a node
        # computed a prefix, for the sibling term
        self.sent = BlockIndex(cfg.limits.index_max_blocks)
        self.pods: dict[str, PodState] = {}
        self.live_nodes: set[str] = set()
        # node -> pull bandwidth its agent measured (bytes/s); the config value until then
        self.bandwidth: dict[str, float] = {}
        self._rr = itertools.count()
        self.apply_config(cfg)

    def apply_config(self, cfg: RouterConfig) -> None:
        """Take a new config: keep state of pods that stay, drop nodes that left."""
        if cfg.contract != self.contract or cfg.model_identity != self.cfg.model_identity:
            self.memo = HashMemo(cfg.contract, cfg.model_identity)
        self.cfg = cfg
        self.contract = cfg.contract
        lim = cfg.limits
        self.index.max_blocks = self.approx.max_blocks = lim.index_max_blocks
        self.sent.max_blocks = lim.index_max_blocks
        new: dict[str, PodState] = {}
        # a pod that joins takes the rate the serving's pods have learned
        rate = next(
            (p.prefill_tps for p in self.pods.values()), cfg.routing.prefill_tokens_per_second
        )
        for pc in cfg.pods:
            old = self.pods.get(pc.name)
            domain = pod_domain(pc.name) if cfg.engine == "vllm" else pc.node
            # a vLLM pod with the node agent (its KV connector) also reads the node's pool
            shared = pc.node if cfg.engine == "vllm" and pc.agent_url else None
            if old is not None and old.cfg.url == pc.url and old.domain == domain:
                old.cfg, old.shared = pc, shared
                new[pc.name] = old
            else:
                new[pc.name] = PodState(pc, rate, domain, shared)
            new[pc.name].breaker.threshold = lim.breaker_failures
            new[pc.name].breaker.cooldown_s = lim.breaker_cooldown_s
        for name in self.sent.nodes:
            if name not in new:
                self.sent.drop_node(name)
        self.pods = new
        self._agents: dict[str, str] = {}
        for pc in cfg.pods:
            if pc.agent_url:
                self._agents.setdefault(pc.node, pc.agent_url)
        nodes = self._nodes = {p.domain for p in new.values()}
        for idx in (self.index, self.approx):
            for node in idx.nodes:
                if node not in nodes:
                    idx.drop_node(node)
        self.live_nodes &= nodes

    def observe_ttft(
        self, pod: PodState, uncached: int, ttft_s: float, queue_s: float, occupancy: int = 0
    ) -> None:
        """Refine the serving's prefill rate from one pod's observed TTFT, for all its
        pods: a serving's replicas run the same model on the same resources, so what
        sets their samples apart is queueing, which the queue term counts already. A
        rate per pod, lowered by a busy spell, counted that queueing twice and moved
        conversations off the engine holding them (vLLM fleet: hit rate 0.797 against
        0.8055 with one rate, 3 rounds each)."""
        base = self.cfg.routing.prefill_tokens_per_second
        pod.observe_ttft(uncached, ttft_s, queue_s, base, occupancy)
        for other in self.pods.values():
            other.prefill_tps, other.interference = pod.prefill_tps, pod.interference
            other.usual_occupancy = pod.usual_occupancy

    def queued(self, pod: PodState, now: float) -> float:
        """Prefill tokens ahead of a request sent to ``pod`` now: ours, and what other
        routers sent as the engine reported it, or, with replicas and no fresher
        report, ours as often as there are replicas (they share nothing but the traffic,
        which a Service spreads evenly)."""
        own = pod.queue_ahead(now)
        return max(own * self.cfg.routing.replicas, own + pod.others_queue(now))

    def forget_node(self, node: str) -> None:
        """The node's agent cleared its cache: what was sent to its pods is gone too
        (the sibling term would otherwise favour a pod for blocks nobody holds)."""
        for pod in self.pods.values():
            if pod.domain == node:
                self.sent.drop_node(pod.name)
                self.recent.drop_node(pod.name)

    @property
    def mode(self) -> str:
        """``events`` (every node live), ``mixed``, or ``approximate`` (no events)."""
        nodes = self._nodes
        if nodes and nodes <= self.live_nodes:
            return "events"
        return "mixed" if self.live_nodes & nodes else "approximate"

    def agent_of(self, node: str) -> str | None:
        return self._agents.get(node)

    # -- the decision ---------------------------------------------------------------
    def hashes(self, tokens: Sequence[int], salt: str) -> list[bytes]:
        return self.memo.block_hashes(tokens, salt)

    def lookup(self, hashes: Sequence[bytes]) -> tuple[PrefixMatch, dict[str, int]]:
        """Runs per node that its agent holds (or, without events, that were sent
        there), and runs per pod of the prefixes sent to it in the last ``RECENT_S``."""
        m = self.index.match(hashes) if self.live_nodes else PrefixMatch()
        if self.mode != "events":
            a = self.approx.match(hashes, touch=False)
            for node, run in a.run.items():
                if node not in self.live_nodes:
                    m.run[node] = run
        if not self._recent_log:
            return m, {}
        self._expire_recent(time.monotonic())
        return m, self.recent.match(hashes, touch=False).run

    def _runs(self, held: Mapping[str, int], recent: Mapping[str, int]) -> dict[str, int]:
        """Per node: what it holds, or what one of its pods is (maybe) computing."""
        runs = dict(held)
        for name, run in recent.items():
            pod = self.pods.get(name)
            if pod is not None and run > runs.get(pod.domain, 0):
                runs[pod.domain] = run
        return runs

    def _expire_recent(self, now: float) -> None:
        log = self._recent_log
        while log and now - log[0][0] > RECENT_S:
            _, pod, hashes = log.popleft()
            self.recent.evict(pod, hashes)

    def decide(
        self, tokens: Sequence[int], salt: str, headers: Mapping[str, str] | None = None
    ) -> Decision:
        pods = [p for p in self.pods.values() if p.available()]
        if not pods:
            raise NoPodAvailable("no pod is healthy (all failing health checks or breakers open)")
        hashes = self.hashes(tokens, salt)
        policy = self.cfg.routing.policy
        if policy == "round-robin":
            k = next(self._rr) % len(pods)
            return Decision(pods[k:] + pods[:k], hashes, {}, 0.0)
        if policy == "least-load":
            pods.sort(key=lambda p: (p.inflight, p.queued_tokens))
            return Decision(pods, hashes, {}, 0.0)
        if policy == "session" and headers is not None:
            key = headers.get(self.cfg.routing.session_header)
            if key:
                return Decision(_rendezvous(pods, key), hashes, {}, 0.0)
        return self._cache_aware(pods, len(tokens), hashes)

    def _cache_aware(self, pods: list[PodState], n_tokens: int, hashes: list[bytes]) -> Decision:
        r = self.cfg.routing
        w = r.weights
        bs = self.contract.block_size
        match, recent = self.lookup(hashes)
        runs = self._runs(match.run, recent) if recent else match.run
        # the best domains, so each pod can find the best *other* one cheaply (a pod
        # has up to two of its own: its engine's, and the node pool it reads)
        best = sorted(runs.items(), key=lambda kv: kv[1], reverse=True)[:3]
        pull_ok = r.pull_hints and self.mode != "approximate"
        pull_s_per_block = r.block_bytes / r.transfer_bytes_per_second
        host_s_per_block = bs / r.host_load_tokens_per_second
        host = match.host
        n = len(pods)
        offset = next(self._rr)  # rotates among equal scores instead of favouring pod 0
        wq, wp, wm, wd, ws = w.queue, w.prefill, w.migration, w.duplication, w.sibling
        wi = w.inflight
        sent = self.sent.match(hashes).run if ws else {}
        agents = self._agents
        now = time.monotonic()
        scored: list[tuple[float, int, int, int, str]] = []
        for i, pod in enumerate(pods):
            tps = pod.prefill_tps
            node, shared = pod.domain, pod.shared
            run = runs.get(node, 0) if runs else 0
            cost = 0.0
            if shared is not None and runs:
                # what the node's pool holds beyond the engine's own cache: a load
                pooled = runs.get(shared, 0)
                if pooled > run:
                    cost += (pooled - run) * host_s_per_block
                    run = pooled
            if recent:
                # a sibling's prefill in progress is not this pod's yet: the engine
                # waits for those blocks instead of computing them twice, about as
                # long as computing them would take
                own = max(match.run.get(node, 0), recent.get(pod.name, 0))
                if run > own:
                    cost += wi * (run - own) * bs / tps
            queued = self.queued(pod, now)
            cost += (wq * queued + wp * (n_tokens - run * bs)) * pod.slowdown(now) / tps
            if sent:
                cost += ws * max(0, run - sent.get(pod.name, 0)) * bs / tps
            peer = ""
            if runs:
                if host:
                    cost += host.get(shared or node, 0) * host_s_per_block
                cand, peer_run = next(
                    ((k, v) for k, v in best if k != node and k != shared), ("", 0)
                )
                if peer_run > run:
                    extra = peer_run - run
                    # leaving the holder copies its blocks here, evicting others later
                    cost += wd * extra * bs / tps
                    # only blocks the peer's agent announced can be pulled: a prefill
                    # still running there (``recent``) has nothing to give yet
                    pullable = match.run.get(cand, 0) - run
                    if pull_ok and pullable > 0 and cand in agents:
                        bw = self.bandwidth.get(shared or node)
                        per_block = r.block_bytes / bw if bw else pull_s_per_block
                        saved = wp * pullable * bs / tps - wm * pullable * per_block
                        if saved > 0:
                            cost -= saved
                            peer = cand
            scored.append((cost, pod.inflight, (i - offset) % n, i, peer))
        scored.sort()
        cost, _, _, _, peer = scored[0]
        hint = PullHint(peer, agents[peer], match.run[peer]) if peer else None
        ranked = [pods[t[3]] for t in scored]
        return Decision(ranked, hashes, dict(runs), cost, hint)

    def record_sent(
        self, node: str, hashes: Sequence[bytes], matched: int = 0, pod: str | None = None
    ) -> None:
        """Remember that ``pod`` (on ``node``) will now hold this prefix: for a few
        seconds in any mode (until its events arrive), and in the approximate index
        without events."""
        if not hashes:
            return
        # refresh the matched prefix in the index's LRU here, off the decision path
        if matched:
            self.index.touch(hashes[:matched])
        if self.mode != "events":
            self.approx.store(node, hashes, DEVICE)
        if pod is None:  # any pod of the node will do
            pod = next((p.name for p in self.pods.values() if p.domain == node), node)
        self.recent.store(pod, hashes, DEVICE)
        self.sent.store(pod, hashes, DEVICE)
        self._recent_log.append((time.monotonic(), pod, hashes))


def _rendezvous(pods: list[PodState], key: str) -> list[PodState]:
    """Highest-random-weight order: stable per key, moves few keys when pods change."""

    def weight(p: PodState) -> bytes:
        return hashlib.blake2b(f"{key}\x00{p.name}".encode(), digest_size=8).digest()

    return sorted(pods, key=weight, reverse=True)
