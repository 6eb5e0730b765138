"""Choosing a pod: hash the prompt, look its prefix up, score the candidates.

Cache-aware scoring (docs/design.md "Routing") estimates each pod's time to first token::

    ttft = w_queue   * queue_ahead / rate                (prefill not yet done on the pod)
         + w_prefill * uncached_tokens / rate          (device-tier hits are free)
         +             host_hit_tokens / host_load_rate (host-tier hits cost a load)
         + min(w_prefill * recompute, w_migration * pull) of the blocks a peer node's
           pool holds beyond this node's run (pull = a fixed latency + bytes / transfer
           bandwidth, both learned; the best such pool, not the best domain: a vLLM
           engine's own cache holds a prefix too, but only a node agent can be pulled
           from)
         + w_duplication * recompute of those same blocks: leaving the node that holds
           a prefix copies it here, and under capacity pressure every copy evicts other
           useful blocks (on the vLLM fleet, 4.0 gave hit rates of 0.796-0.809 against
           0.795-0.798 at 2.0, and p50 94-117 ms against 108-124; on the whole Mooncake
           replay with engines decoding, every request sent off its prefix's engine
           went because that engine's prefill queue was real, and those moves were
           what the hit rate lost to the SGLang router: 16.0 keeps them for queues of
           about 17 recomputes: decode hit rate 0.6361-0.6388 over 3 rounds against
           0.6342-0.6373 at 4.0, p90 unchanged; the vLLM fleet gave the same hit
           rate and p50)
         + w_inflight * recompute of blocks a sibling engine is computing right now:
           the engine waits for them (the agent's claims say which) and uses them
           instead of computing them twice
         + w_sibling * recompute of the node's run beyond what this pod was sent: a
           sibling engine reads the node's blocks too, a little slower than the
           engine that computed them (the queue term still moves a request to an
           idle sibling; a busy engine's users spread, an idle one keeps its own)
         + w_balance * recompute of the blocks the pod's cache holds beyond the
           smallest one's, only where no pod has a longer run than another (a new
           conversation): what a pod caches is what later turns will ask of it, so
           conversations spread by the load they will bring, not only by the queue
           of the moment (as the SGLang router's "smallest tree")

A prompt no pod holds any of (a new conversation) also pays up to ``COLD_SPREAD`` of
the cheapest cost by how much more its pod's cache took in lately than the least's
(``PodState.stored_lately``): among about equally idle pods it goes to the one whose
cache turns over slowest.

The minimum wins, ties broken by load. When the pull is the cheaper path the
decision carries a ``PullHint`` for the ``x-kvmarina-pull`` header.

The prefix lookup reads the event-fed index for nodes whose agent stream is live,
and the router's own record of where it sent each prefix (the approximate index)
for the others; ``mode`` says which of the two is in use.

Cost of a decision: the prompt is hashed only as far as some index still holds its
prefix (``_prefix``; the rest of the chain is hashed once the request is on its way,
for ``record_sent``), each index lookup costs one bisect per distinct run length
(``BlockIndex.match``), and the scoring is one pass over the available pods.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter

from kvmarina.events import LoadRecord
from kvmarina.headers import PullHint
from kvmarina.router.config import RouterConfig
from kvmarina.router.decision import Decision, Scored
from kvmarina.router.hashmemo import HashMemo, PromptHashes
from kvmarina.router.index import DEVICE, BlockIndex, PrefixMatch, any_holds
from kvmarina.router.live_set import LiveSet
from kvmarina.router.pods import ENGINE_LOAD_STALE_S, PodState

RECENT_S = 2.0
#: the learned fixed cost of a pull is forgotten at this half-life: a router that
#: stopped pulling because pulls were slow gets no new samples, and would never
#: try again on a fleet whose pulls have since become cheap
PULL_LATENCY_HALF_LIFE_S = 300.0
PULL_LATENCY_MAX_S = 1.0
#: with router replicas, the cost of a pod where no prompt block lies is scaled by
#: 1 + this x U(0, 1): replicas that share nothing see the same idle engines at the
#: same time, and without it they send their cold prompts to the same one (the one
#: with the best learned rate), where they queue behind each other. Two replicas,
#: decode replay, p90 over one replica's, medians of 3 rounds (``--repeat 3``): 1.049x
#: and 1.051x at 0.25 (1.046x over 5 rounds), 1.065x and 1.066x at 1.0, 1.082x at 0.
#: One router is unchanged. Since the replay is the front and the simulated engines
#: announce a prompt as its prefill starts: 1.066x at 0.25, 1.080x at 0 (3 rounds).
REPLICA_SPREAD = 0.25
#: a new conversation (a prompt no pod holds any of) goes, among the pods within this
#: fraction of the cheapest, to the one whose cache took in the fewest new blocks
#: lately: every block a cache takes in evicts one, so an even intake keeps every
#: pod's conversations cached about as long
COLD_SPREAD = 0.1
#: a request is taken back from the pod it was sent to (``worth_moving``) only when the
#: runner-up beats staying there by this much, and by this share of the runner-up's
#: cost: a request moved for a few milliseconds would trade a sure place for a guess
MOVE_MIN_S = 0.02
MOVE_MARGIN = 0.25


def pod_domain(pod: str) -> str:
    """The cache domain of an engine that keeps its KV to itself (no DNS name of a
    node contains '/', so it never names a node)."""
    return f"pod/{pod}"


class NoPodAvailable(RuntimeError):
    """Every pod is unhealthy or has an open breaker."""


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
        self._live_nodes = LiveSet()
        self._nodes: set[str] = set()
        self._mode_for: tuple[LiveSet, int, set[str], str] | None = None
        self._rates_shared = False  # every pod has the learned rate (none joined since)
        # node -> pull bandwidth its agent measured (bytes/s); the config value until then
        self.bandwidth: dict[str, float] = {}
        # what a hinted pull costs beyond its bytes (the pulling engine's handshakes
        # with its agent, the peer's agent sharing the CPU with its engine), learned
        # from the TTFTs of pulling requests
        self.pull_latency_s = 0.0
        self._pull_seen = 0.0
        self._rr = itertools.count()
        self._spread = random.Random()  # REPLICA_SPREAD's draws (tests seed it)
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
        on_node: dict[str, list[PodState]] = {}
        for p in new.values():
            on_node.setdefault(p.node, []).append(p)
        self._only_pod = {node: ps[0] for node, ps in on_node.items() if len(ps) == 1}
        self._rates_shared = False
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
        before = (pod.prefill_tps, pod.interference, pod.usual_occupancy)
        pod.observe_ttft(uncached, ttft_s, queue_s, base, occupancy)
        learned = (pod.prefill_tps, pod.interference, pod.usual_occupancy)
        if learned == before and self._rates_shared:
            return  # a sample too small to learn from: every pod has these already
        for other in self.pods.values():
            other.prefill_tps, other.interference = pod.prefill_tps, pod.interference
            other.usual_occupancy = pod.usual_occupancy
        self._rates_shared = True

    def observe_pull(self, pod: PodState, blocks: int, spent_s: float) -> None:
        """A pulling request's first token came ``spent_s`` after its queue and prefill
        should have let it: what its ``blocks`` pulled took. The part beyond their bytes
        is the pull's fixed latency (an EWMA, clamped: a pull that timed out says the
        peer was stalled, not what pulls cost). Such a TTFT is not a prefill sample."""
        r = self.cfg.routing
        bw = self.bandwidth.get(pod.shared or pod.domain) or r.transfer_bytes_per_second
        sample = spent_s - blocks * r.block_bytes / bw
        sample = min(max(sample, 0.0), PULL_LATENCY_MAX_S)
        now = time.monotonic()
        lat = self.pull_latency(now)
        self.pull_latency_s, self._pull_seen = lat + 0.2 * (sample - lat), now

    def pull_latency(self, now: float) -> float:
        """The learned fixed cost of a pull, as forgotten by ``now``."""
        lat = self.pull_latency_s
        if lat:
            lat *= 0.5 ** ((now - self._pull_seen) / PULL_LATENCY_HALF_LIFE_S)
        return lat

    def queued(self, pod: PodState, now: float) -> float:
        """Prefill tokens ahead of a request sent to ``pod`` now: ours, and what other
        routers sent as the engine last reported it; with replicas and no report from
        the engine, ours as often as there are replicas (they share nothing but the
        traffic, which a Service spreads evenly). A report wins over that guess: the
        guess, taken as a floor, had each replica count every pod's queue twice, and
        send conversations away from the engines holding them (router_replay, decode,
        two replicas: hit rate 0.926x of one replica's with it, 0.979x without)."""
        own = pod.queue_ahead(now)
        if pod.engine_fresh(now) is None:
            return own * self.cfg.routing.replicas
        total = pod.engine_queue(now)
        if total is not None:
            return max(own, total)
        return own + pod.others_waiting(now)

    def worth_moving(self, decision: Decision, pod: PodState, extra_s: float) -> bool:
        """Whether to take a request back from ``pod``, the decision's best, which had
        ``extra_s`` more prefill ahead of it than the decision counted: router
        replicas share nothing, and two of them can send prompts to one idle engine
        within a millisecond, sooner than either hears of the other's; the engine's
        early head (``kvmarina.load_report.AHEAD_HEADER``) tells the second one."""
        if extra_s <= 0 or pod is not decision.best:
            return False
        alt = decision.runner_up_cost()
        if alt is None:
            return False
        gain = decision.est_ttft_s + extra_s - alt
        return gain > MOVE_MIN_S and gain > MOVE_MARGIN * alt

    def not_computing(self, pod: PodState, decision: Decision) -> None:
        """The request was taken back from ``pod`` before its prefill: what it would
        have computed there is not coming (what the pod held before stays)."""
        start = decision.cached_blocks.get(pod.domain, 0)
        self.recent.evict(pod.name, decision.hashes[start:])

    def note_pushed_load(self, node: str, rec: LoadRecord) -> None:
        """An engine's load pushed on its node's stream: the pod it names, or the
        node's only pod when it names none (an engine that does not know its pod)."""
        pod = self.pods.get(rec.pod) if rec.pod else self._only_pod.get(node)
        if pod is None:
            return
        pod.pushed += 1
        pod.note_engine(rec.load, time.monotonic())

    def forget_node(self, node: str) -> None:
        """The node's agent cleared its cache: what was sent to its pods is gone too
        (the sibling term would otherwise favour a pod for blocks nobody holds)."""
        for pod in self.pods.values():
            if pod.domain == node:
                self.sent.drop_node(pod.name)
                self.recent.drop_node(pod.name)

    @property
    def live_nodes(self) -> LiveSet:
        """Domains whose event stream is current (see the class docstring)."""
        return self._live_nodes

    @live_nodes.setter
    def live_nodes(self, value: Iterable[str]) -> None:
        if value is not self._live_nodes:
            self._live_nodes = LiveSet(value)

    @property
    def mode(self) -> str:
        """``events`` (every node live), ``mixed``, or ``approximate`` (no events)."""
        live, nodes, memo = self._live_nodes, self._nodes, self._mode_for
        if memo is not None and memo[0] is live and memo[1] == live.version and memo[2] is nodes:
            return memo[3]
        mode = "events" if nodes and nodes <= live else "mixed" if live & nodes else "approximate"
        self._mode_for = (live, live.version, nodes, mode)
        return mode

    def agent_of(self, node: str) -> str | None:
        return self._agents.get(node)

    # -- the decision ---------------------------------------------------------------
    def hashes(self, tokens: Sequence[int], salt: str) -> list[bytes]:
        return self.memo.block_hashes(tokens, salt)

    def lookup(self, hashes: Sequence[bytes]) -> tuple[PrefixMatch, dict[str, int]]:
        """Runs per node that its agent holds (or, without events, that were sent
        there), and runs per pod of the prefixes sent to it in the last ``RECENT_S``."""
        if self._recent_log:
            self._expire_recent(time.monotonic())
        return self._lookup(hashes, self.mode)

    def _lookup(self, hashes: Sequence[bytes], mode: str) -> tuple[PrefixMatch, dict[str, int]]:
        live = self._live_nodes
        m = self.index.match(hashes) if live else PrefixMatch()
        if mode != "events":
            a = self.approx.match(hashes, touch=False)
            for node, run in a.run.items():
                if node not in live:
                    m.run[node] = run
        if not self._recent_log:
            return m, {}
        return m, self.recent.match(hashes, touch=False).run

    def _prefix(self, chain: PromptHashes, mode: str, sibling: bool) -> list[bytes]:
        """The prompt's hashes as far as any index could match them: once no index
        holds the last hash computed, no node's run (nor pod's) reaches past it, so the
        blocks after it cannot change the decision. Probes grow with what had to be
        hashed (memoized chunks cost a lookup), so a long shared prefix with a fresh
        tail hashes a few blocks of the tail, and a cold prompt a few blocks."""
        sources = []
        if self._live_nodes and self.index:
            sources.append(self.index)
        if mode != "events" and self.approx:
            sources.append(self.approx)
        if self._recent_log and self.recent:
            sources.append(self.recent)
        if sibling and self.sent:
            sources.append(self.sent)
        if not sources:
            return []
        hs = chain.upto(4)
        while len(hs) < chain.n_blocks and any_holds(sources, hs[-1]):
            hs = chain.upto(len(hs) + max(4, chain.hashed))
        return hs

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
        # ``available()``, inlined: a closed breaker is the common case
        pods = [
            p
            for p in self.pods.values()
            if p.healthy and (p.breaker.state == "closed" or p.breaker.allows())
        ]
        if not pods:
            raise NoPodAvailable("no pod is healthy (all failing health checks or breakers open)")
        chain = self.memo.chain(tokens, salt)
        policy = self.cfg.routing.policy
        if policy == "round-robin":
            k = next(self._rr) % len(pods)
            return Decision(pods[k:] + pods[:k], chain, {}, 0.0)
        if policy == "least-load":
            pods.sort(key=lambda p: (p.inflight, p.queued_tokens))
            return Decision(pods, chain, {}, 0.0)
        if policy == "session" and headers is not None:
            key = headers.get(self.cfg.routing.session_header)
            if key:
                return Decision(_rendezvous(pods, key), chain, {}, 0.0)
        return self._cache_aware(pods, len(tokens), chain)

    def _cache_aware(self, pods: list[PodState], n_tokens: int, chain: PromptHashes) -> Decision:
        r = self.cfg.routing
        w = r.weights
        bs = self.contract.block_size
        mode = self.mode
        if self._recent_log:
            self._expire_recent(time.monotonic())
        hashes = self._prefix(chain, mode, bool(w.sibling))
        match, recent = self._lookup(hashes, mode)
        runs = self._runs(match.run, recent) if recent else match.run
        # the best domains, so each pod can find the best *other* one cheaply (a pod
        # has up to two of its own: its engine's, and the node pool it reads)
        best = sorted(runs.items(), key=itemgetter(1), reverse=True)[:3]
        pull_ok = r.pull_hints and mode != "approximate"
        agents = self._agents
        match_run = match.run
        # the node pools a pod could pull from (announced blocks only: a prefill still
        # running there, ``recent``, has nothing to give yet), best first
        sources: list[tuple[str, int]] = []
        if pull_ok:
            pools = ((k, v) for k, v in match_run.items() if k in agents)
            sources = sorted(pools, key=itemgetter(1), reverse=True)[:3]
        pull_s_per_block = r.block_bytes / r.transfer_bytes_per_second
        host_s_per_block = bs / r.host_load_tokens_per_second
        host = match.host
        n = len(pods)
        offset = next(self._rr)  # rotates among equal scores instead of favouring pod 0
        wq, wp, wm, wd, ws = w.queue, w.prefill, w.migration, w.duplication, w.sibling
        wi = w.inflight
        # (the sibling term needs a pod whose node holds some of the prompt)
        sent = self.sent.match(hashes).run if ws and runs else {}
        now = time.monotonic()
        pull_fixed = wm * self.pull_latency(now) if pull_ok else 0.0
        replicas = r.replicas
        spread = self._spread.random if replicas > 1 else None
        bandwidth = self.bandwidth
        scored: list[Scored] = []
        append = scored.append
        cold: dict[object, tuple[float, float, str]] = {}
        # the least and the longest run any pod has: equal, no pod has an edge
        lo, hi = n_tokens, 0
        for i, pod in enumerate(pods):
            tps = pod.prefill_tps
            # the pod's load: RoutingCore.queued() and PodState.slowdown(), inlined (the
            # same arithmetic; five calls deep per pod, they were most of the loop;
            # ``x if x > y else y`` is ``max(y, x)`` without the call)
            q = pod.queued_tokens
            own = 0.0
            if q > 0:
                left = q - tps * (now - pod.busy_since)
                own = left if left > 0.0 else 0.0
            e = pod.engine
            if e is None or not now - pod.engine_at <= ENGINE_LOAD_STALE_S:
                queued, occupancy = own * replicas, pod.decoding
            else:
                if e.queued_tokens is not None:
                    total: float = e.queued_tokens + pod.sent_tokens - pod.sent_at_poll
                    total -= tps * (now - pod.engine_at)
                    queued = total if total > own else own
                else:
                    others = max(0, e.waiting - pod.prefilling_at_poll) * pod.tokens_per_request
                    others -= tps * (now - pod.engine_at)
                    queued = own + others if others > 0.0 else own
                occupancy = max(pod.decoding, e.running)
            a = pod.interference
            slowdown = (1.0 + a * occupancy) / (1.0 + a * pod.usual_occupancy) if a else 1.0
            node, shared = pod.domain, pod.shared
            if not runs or (node not in runs and (shared is None or shared not in runs)):
                # nothing of the prompt where this pod reads: the terms below reduce to
                # the queue and the prefill, plus (if a peer holds some) duplication
                # and maybe a pull, which depend on the pod only through its rate and
                # its node's bandwidth (so they are worked out once per such pair)
                cost = 0.0 + (wq * queued + wp * n_tokens) * slowdown / tps
                peer = ""
                if runs:
                    bw = bandwidth.get(shared or node) if bandwidth else None
                    key = (tps, bw) if bw else tps
                    terms = cold.get(key)
                    if terms is None:
                        first = sources[0] if sources else None
                        terms = cold[key] = self._away_terms(tps, bw, best[0][1], first, pull_fixed)
                    dup, saved, peer = terms
                    cost += dup
                    if saved > 0:
                        cost -= saved
                lo = 0
                if spread:
                    cost *= 1.0 + REPLICA_SPREAD * spread()
                append((cost, pod.inflight, (i - offset) % n, i, peer))
                continue
            run = runs.get(node, 0)
            cost = 0.0
            if shared is not None:
                # what the node's pool holds beyond the engine's own cache: a load
                pooled = runs.get(shared, 0)
                if pooled > run:
                    cost += (pooled - run) * host_s_per_block
                    run = pooled
            if run < lo:
                lo = run
            if run > hi:
                hi = run
            if recent:
                # a sibling's prefill in progress is not this pod's yet: the engine
                # waits for those blocks instead of computing them twice, about as
                # long as computing them would take
                own = max(match_run.get(node, 0), recent.get(pod.name, 0))
                if run > own:
                    cost += wi * (run - own) * bs / tps
            cost += (wq * queued + wp * (n_tokens - run * bs)) * slowdown / tps
            if sent:
                cost += ws * max(0, run - sent.get(pod.name, 0)) * bs / tps
            peer = ""
            if host:
                cost += host.get(shared or node, 0) * host_s_per_block
            peer_run = 0
            for k, v in best:
                if k != node and k != shared:
                    peer_run = v
                    break
            if peer_run > run:
                extra = peer_run - run
                # leaving the holder copies its blocks here, evicting others later
                cost += wd * extra * bs / tps
                src, src_run = "", 0
                for k, v in sources:
                    if k != node and k != shared:
                        src, src_run = k, v
                        break
                pullable = src_run - run
                if pullable > 0:
                    bw = bandwidth.get(shared or node)
                    per_block = r.block_bytes / bw if bw else pull_s_per_block
                    saved = wp * pullable * bs / tps - wm * pullable * per_block - pull_fixed
                    if saved > 0:
                        cost -= saved
                        peer = src
            append((cost, pod.inflight, (i - offset) % n, i, peer))
        if not runs and n > 1:
            _spread_cold(scored, pods, now)
        if lo >= hi and w.balance:
            self._balance(scored, pods, w.balance * bs)
        cost, _, _, top, peer = min(scored)
        hint = PullHint(peer, agents[peer], match.run[peer]) if peer else None
        d = Decision(pods, chain, dict(runs), cost, hint, scored, pods[top])
        d.on_attempt = self._computing
        return d

    def _balance(self, scored: list[Scored], pods: list[PodState], per_block: float) -> None:
        """Add the balance term to every pod's cost (``_cache_aware``, where no pod has
        an edge): ``per_block`` (weight x block size) over the pod's rate per block
        its cache holds beyond the smallest cache's."""
        live = self._live_nodes
        sizes = [
            (self.index if p.domain in live else self.approx).blocks_of(p.domain) for p in pods
        ]
        least = min(sizes)
        for j, (cost, inflight, rot, i, peer) in enumerate(scored):
            extra = sizes[i] - least
            if extra:
                scored[j] = (cost + per_block * extra / pods[i].prefill_tps, inflight, rot, i, peer)

    def _away_terms(
        self,
        tps: float,
        bw: float | None,
        peer_run: int,
        source: tuple[str, int] | None,
        pull_fixed: float,
    ) -> tuple[float, float, str]:
        """For a pod none of whose domains holds the prompt: the duplication term, the
        time a pull would save (0 when it would not be asked for), and the node pool to
        pull from; the loop in ``_cache_aware`` with ``run`` = 0, term by term."""
        r = self.cfg.routing
        w = r.weights
        bs = self.contract.block_size
        dup = w.duplication * peer_run * bs / tps
        if source is not None and source[1] > 0:
            cand, pullable = source
            pull_s_per_block = r.block_bytes / r.transfer_bytes_per_second
            per_block = r.block_bytes / bw if bw else pull_s_per_block
            saved = w.prefill * pullable * bs / tps - w.migration * pullable * per_block
            saved -= pull_fixed
            if saved > 0:
                return dup, saved, cand
        return dup, 0.0, ""

    def _computing(self, pod: PodState, hashes: list[bytes]) -> float | None:
        """The request is on its way to ``pod``, which computes its prompt now:
        ``recent`` says so at once (the time it did is returned). ``record_sent`` comes
        when the engine answers, after its prefill (ours, the simulated one), so a
        request sharing the prefix that came meanwhile saw no pod holding it and
        recomputed it elsewhere; sent to the pod computing it, it waits for those
        blocks and reads them (decode replay: the SGLang router, which records at once,
        got 0.01 of its 0.227 hit rate from such requests, kvmarina none)."""
        if not hashes:
            return None
        now = time.monotonic()
        self.recent.store(pod.name, hashes, DEVICE)
        self._recent_log.append((now, pod.name, hashes))
        return now

    def record_sent(
        self,
        node: str,
        hashes: Sequence[bytes],
        matched: int = 0,
        pod: str | None = None,
        computing_at: float | None = None,
    ) -> None:
        """Remember that ``pod`` (on ``node``) will now hold this prefix: for a few
        seconds in any mode (until its events arrive), and in the approximate index
        without events. ``computing_at``: when ``_computing`` noted the same pod and
        prompt in ``recent``; while that note stands it is not made again."""
        if not hashes:
            return
        # refresh the matched prefix in the index's LRU here, off the decision path
        if matched:
            self.index.touch(hashes[:matched])
        if self.mode != "events":
            self.approx.store(node, hashes, DEVICE)
        if pod is None:  # any pod of the node will do
            pod = next((p.name for p in self.pods.values() if p.domain == node), node)
        self.sent.store(pod, hashes, DEVICE)
        now = time.monotonic()
        if computing_at is None or now - computing_at > RECENT_S:
            # ``recent`` holds a prefix RECENT_S from its first note: an expiry clears
            # the pod's bit whatever came later (so a second note would change nothing)
            self.recent.store(pod, hashes, DEVICE)
            self._recent_log.append((now, pod, hashes))


def _spread_cold(scored: list[Scored], pods: list[PodState], now: float) -> None:
    """A prompt no pod holds any of: add up to ``COLD_SPREAD`` of the cheapest cost to
    each pod's, by how much more its cache took in lately than the least's."""
    if not any(p.stored for p in pods):  # nothing sent yet: skip the decays
        return
    stored = [p.stored_lately(now) for p in pods]
    least, most = min(stored), max(stored)
    if most <= least:
        return
    k = COLD_SPREAD * min(scored)[0] / (most - least)
    for j, (cost, inflight, rot, i, peer) in enumerate(scored):
        scored[j] = (cost + k * (stored[i] - least), inflight, rot, i, peer)


def _rendezvous(pods: list[PodState], key: str) -> list[PodState]:
    """Highest-random-weight order: stable per key, moves few keys when pods change."""

    def weight(p: PodState) -> bytes:
        return hashlib.blake2b(f"{key}\x00{p.name}".encode(), digest_size=8).digest()

    return sorted(pods, key=weight, reverse=True)
