"""Typed models of the two custom resources: ``KVCachePool`` and ``ModelServing``.

These models are the single source of the CRD schemas: ``kvmarina.crd`` renders
``crds/*.yaml`` from them (a test keeps the files in step), so a field, its
description, default, enum and bounds are written once, here. Field names are
camelCase on the wire (``blockSize``) and snake_case in Python (``block_size``).

Every field carries a description: it is what ``kubectl explain`` shows.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from kvmarina.hashing import ALGORITHMS, HashContract
from kvmarina.quantity import QUANTITY_PATTERN, parse_bytes

GROUP = "kvmarina.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Scope = Literal["none", "namespace", "cluster"]
SCOPE_ORDER: dict[str, int] = {"none": 0, "namespace": 1, "cluster": 2}
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN)]
IntOrString = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True})]
DNSName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]


class Spec(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# ---------------------------------------------------------------- shared pieces


class Toleration(Spec):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="For NoExecute: how long the pod stays bound after the taint."
    )


class Resources(Spec):
    """Compute resources of a container (core/v1 ResourceRequirements, quantities as strings)."""

    requests: dict[str, IntOrString] = Field(
        default_factory=dict, description="Minimum resources, e.g. {cpu: '2', memory: 8Gi}."
    )
    limits: dict[str, IntOrString] = Field(
        default_factory=dict, description="Maximum resources, e.g. {'nvidia.com/gpu': '1'}."
    )


class NetworkPolicySpec(Spec):
    """NetworkPolicies for the objects kvmarina creates."""

    enabled: bool = Field(
        True,
        description="Create NetworkPolicies. Turn off on clusters whose network plugin does "
        "not enforce them.",
    )


# ---------------------------------------------------------------- KVCachePool


class HashingSpec(Spec):
    """The block-hashing contract every component of the pool uses."""

    block_size: int = Field(16, ge=1, le=4096, description="Tokens per KV block.")
    algorithm: Literal["blake2b", "sha256"] = Field(
        "blake2b", description="Cryptographic hash naming blocks."
    )
    digest_bits: Literal[128, 256] = Field(
        128, description="Digest length in bits (sha256 allows 256 only)."
    )

    @model_validator(mode="after")
    def _digest_fits_algorithm(self) -> HashingSpec:
        allowed = [s * 8 for s in ALGORITHMS[self.algorithm]]
        if self.digest_bits not in allowed:
            raise ValueError(
                f"digestBits {self.digest_bits} is not available for {self.algorithm}; "
                f"allowed: {', '.join(map(str, allowed))}"
            )
        return self

    def contract(self) -> HashContract:
        return HashContract(self.block_size, self.algorithm, self.digest_bits // 8)


class PoolSharingSpec(Spec):
    """Which prefix-sharing scopes the pool allows its servings."""

    default_scope: Scope = Field(
        "namespace",
        description="Scope a serving gets when it names none: none (private to the serving), "
        "namespace, or cluster (all tenants; prefix timing can leak prompts across tenants).",
    )
    max_scope: Scope = Field(
        "cluster", description="Widest scope a serving of this pool may ask for."
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> PoolSharingSpec:
        if SCOPE_ORDER[self.default_scope] > SCOPE_ORDER[self.max_scope]:
            raise ValueError(
                f"defaultScope {self.default_scope!r} is wider than maxScope {self.max_scope!r}"
            )
        return self


class MemorySpec(Spec):
    """KV memory the agent owns on each node."""

    backend: Literal["cuda", "cpu"] = Field(
        "cuda", description="cuda: GPU memory (device tier); cpu: shared host memory."
    )
    device: Quantity = Field(
        "8Gi", description="Device-tier bytes per node (GPU memory, or shared RAM for cpu)."
    )
    host: Quantity = Field(
        "0", description="Host-tier bytes per node for offloaded blocks; 0 turns the tier off."
    )
    page_size: Quantity = Field("2Mi", description="Allocation unit lent to engines.")

    @model_validator(mode="after")
    def _sizes(self) -> MemorySpec:
        page, device = parse_bytes(self.page_size), parse_bytes(self.device)
        if page < 4096:
            raise ValueError(f"pageSize {self.page_size} is below the 4Ki minimum")
        if device < page:
            raise ValueError(f"device {self.device} is smaller than one page ({self.page_size})")
        return self

    @property
    def device_bytes(self) -> int:
        return parse_bytes(self.device)

    @property
    def host_bytes(self) -> int:
        return parse_bytes(self.host)

    @property
    def page_bytes(self) -> int:
        return parse_bytes(self.page_size)


class EvictionSpec(Spec):
    """How the agent frees memory under pressure."""

    policy: Literal["lru", "lfu"] = Field("lru", description="Which unpinned blocks go first.")
    reclaim_timeout_seconds: int = Field(
        5, ge=1, le=300, description="How long engines get to release pages when asked."
    )


class MigrationSpec(Spec):
    """Block transfers between the pool's agents."""

    enabled: bool = Field(True, description="Let agents pull blocks from peers.")
    port: int = Field(7471, ge=1024, le=65535, description="TCP port of the transfer service.")
    streams_per_peer: int = Field(4, ge=1, le=64, description="Concurrent streams per peer.")
    auth: Literal["mtls", "token"] = Field(
        "mtls", description="Peer authentication: mutual TLS, or an HMAC token handshake."
    )
    checksum: Literal["xxh3", "crc32c"] = Field(
        "xxh3", description="Per-block checksum verified before a block becomes visible."
    )
    timeout_seconds: int = Field(30, ge=1, le=3600, description="Stalled-transfer timeout.")


class AgentSpec(Spec):
    """The agent DaemonSet's pod settings."""

    image: str | None = Field(None, description="Agent image; defaults to the operator's.")
    http_port: int = Field(
        7470, ge=1024, le=65535, description="Port of health, metrics, stats and events."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Agent container resources."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Agent log level."
    )


class KVCachePoolSpec(Spec):
    """A node-level KV cache shared by the servings that reference it."""

    hashing: HashingSpec = Field(default_factory=HashingSpec, description=HashingSpec.__doc__)
    sharing: PoolSharingSpec = Field(
        default_factory=PoolSharingSpec, description=PoolSharingSpec.__doc__
    )
    memory: MemorySpec = Field(default_factory=MemorySpec, description=MemorySpec.__doc__)
    eviction: EvictionSpec = Field(default_factory=EvictionSpec, description=EvictionSpec.__doc__)
    migration: MigrationSpec = Field(
        default_factory=MigrationSpec, description=MigrationSpec.__doc__
    )
    agent: AgentSpec = Field(default_factory=AgentSpec, description=AgentSpec.__doc__)
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Nodes that run an agent (label selector)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations of the agent pods."
    )
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description=NetworkPolicySpec.__doc__
    )


# ---------------------------------------------------------------- ModelServing


class PoolRef(Spec):
    """The KVCachePool whose memory this serving uses."""

    name: DNSName = Field(description="Name of a KVCachePool (cluster-scoped).")


class ModelSpec(Spec):
    """The model served, and where its weights come from."""

    name: str = Field(min_length=1, max_length=256, description="Model name clients ask for.")
    revision: str = Field(
        "main", min_length=1, description="Weights revision; part of KV identity."
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Compute and KV dtype."
    )
    preset: Literal["tiny", "small"] | None = Field(
        None, description="Random seeded weights of a size preset (tests, demos); no download."
    )
    pvc: str | None = Field(None, description="PersistentVolumeClaim holding the weights.")
    path: str = Field(
        "/models", description="Directory (Hugging Face layout) of the weights inside the volume."
    )
    max_model_len: int = Field(4096, ge=16, le=1048576, description="Longest context in tokens.")
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Devices per engine replica (vLLM's --tensor-parallel-size); the "
        "reference engine runs on one.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.preset is None and self.pvc is None:
            raise ValueError("model needs weights: set preset (tiny|small) or pvc")
        if self.preset is not None and self.pvc is not None:
            raise ValueError("set either preset or pvc, not both")
        return self


#: The engines a ModelServing can run; SGLang may follow.
ENGINE_TYPES = ("reference", "vllm")
EngineType = Literal["reference", "vllm"]


class VLLMSpec(Spec):
    """Pod ports of a vLLM engine (``engine.type: vllm``). Every vLLM flag the pool's
    contract implies (block size, prefix caching, KV events, prompt-token details, KV
    cache size) is derived by kvmarina; these are the only vLLM settings of its own."""

    events_port: int = Field(
        5557,
        ge=1024,
        le=65535,
        description="Pod port of vLLM's KV-event publisher (ZMQ PUB); the router subscribes.",
    )
    replay_port: int = Field(
        5558,
        ge=1024,
        le=65535,
        description="Pod port of vLLM's KV-event replay service (ZMQ ROUTER); the router asks "
        "it for event batches it missed.",
    )

    kv_connector: bool = Field(
        True,
        description="Load kvmarina's KV connector into vLLM: its pods read prefixes from "
        "the node agent's pool (their own and their siblings'), save the blocks they "
        "compute there, and pull from peer nodes when the router says so. Off: each "
        "pod's KV stays its own.",
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> VLLMSpec:
        if self.events_port == self.replay_port:
            raise ValueError(f"eventsPort and replayPort are both {self.events_port}")
        return self


class EngineSpec(Spec):
    """The engine pods."""

    type: EngineType = Field(
        "reference",
        description="Which model server the pods run: reference (kvmarina's own engine) or "
        "vllm (flags derived from the pool's contract; the router follows its KV events).",
    )
    image: str | None = Field(
        None, description="Engine image; defaults to the operator's image for the engine type."
    )
    simulate: bool = Field(
        False,
        description="Run the simulated engine (timing model, no weights) for testing "
        "(reference engine only).",
    )
    resources: Resources = Field(
        default_factory=Resources, description="Engine container resources."
    )
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Running sequences per engine (vLLM: --max-num-seqs)."
    )
    max_waiting: int = Field(
        256,
        ge=0,
        le=100000,
        description="Queued requests before the engine refuses more (reference: 429; vLLM: "
        "--max-num-queued-reqs of maxBatchSize + maxWaiting, 503).",
    )
    args: list[str] = Field(
        default_factory=list,
        description="Extra engine arguments, appended to the ones kvmarina derives (which they "
        "may not repeat).",
    )
    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description=VLLMSpec.__doc__)

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> EngineSpec:
        if self.type == "vllm":
            if self.simulate:
                raise ValueError(
                    "simulate runs kvmarina's simulated engine; it cannot be combined with "
                    "type vllm (remove simulate, or use type reference)"
                )
        elif "vllm" in self.model_fields_set:
            raise ValueError(
                f"engine.vllm configures vLLM pods, but engine.type is {self.type!r} "
                "(set type: vllm, or remove the vllm section)"
            )
        return self


class BudgetSpec(Spec):
    """This serving's share of the pool on each node."""

    min: Quantity = Field("0", description="Guaranteed bytes per node, always grantable.")
    max: Quantity = Field("1Gi", description="Most bytes per node this serving may hold.")
    priority: int = Field(
        100, ge=0, le=1000, description="Above the minimum, higher priority wins memory."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> BudgetSpec:
        if parse_bytes(self.min) > parse_bytes(self.max):
            raise ValueError(f"budget min {self.min} is larger than max {self.max}")
        return self

    @property
    def min_bytes(self) -> int:
        return parse_bytes(self.min)

    @property
    def max_bytes(self) -> int:
        return parse_bytes(self.max)


class ServingSharingSpec(Spec):
    """Who may share this serving's cached prefixes (docs/design.md "Tenancy")."""

    scope: Scope | None = Field(
        None,
        description="none | namespace | cluster; empty takes the pool's defaultScope.",
    )
    tenant_header: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9-]+$",
        description="Request header the router trusts to name the tenant (salts the hashes).",
    )
    allow_client_salt: bool = Field(
        False, description="Accept a salt supplied by the client (x-kvmarina-salt)."
    )


class RoutingWeights(Spec):
    """Weights of the router's estimated time to first token."""

    queue: float = Field(1.0, ge=0, le=100, description="Weight of the pod's queue.")
    prefill: float = Field(1.0, ge=0, le=100, description="Weight of uncached prefill.")
    migration: float = Field(1.0, ge=0, le=100, description="Weight of pulling from a peer.")


class RoutingSpec(Spec):
    """The router in front of the engines."""

    policy: Literal["cache-aware", "least-load", "round-robin", "session"] = Field(
        "cache-aware", description="How the router picks a pod."
    )
    session_header: str = Field(
        "x-session-id", description="Header that pins a session (policy session)."
    )
    replicas: int = Field(1, ge=1, le=64, description="Router replicas.")
    weights: RoutingWeights = Field(
        default_factory=RoutingWeights, description=RoutingWeights.__doc__
    )
    prefill_tokens_per_second: float | None = Field(
        None, gt=0, description="Initial prefill rate per pod; refined from observed TTFTs."
    )


class AutoscalingSpec(Spec):
    """A HorizontalPodAutoscaler for the engine Deployment."""

    enabled: bool = Field(False, description="Create an HPA.")
    min_replicas: int = Field(1, ge=1, le=1000, description="Fewest engine replicas.")
    max_replicas: int = Field(4, ge=1, le=1000, description="Most engine replicas.")
    target_cpu_utilization: int = Field(80, ge=1, le=100, description="Target CPU percent.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas {self.min_replicas} is larger than maxReplicas {self.max_replicas}"
            )
        return self


class ModelServingSpec(Spec):
    """A model served by engine pods that share a KVCachePool, behind a cache-aware router."""

    pool_ref: PoolRef = Field(description=PoolRef.__doc__)
    model: ModelSpec = Field(description=ModelSpec.__doc__)
    replicas: int = Field(1, ge=0, le=1000, description="Engine replicas.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description=EngineSpec.__doc__)
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description=BudgetSpec.__doc__)
    sharing: ServingSharingSpec = Field(
        default_factory=ServingSharingSpec, description=ServingSharingSpec.__doc__
    )
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description=RoutingSpec.__doc__)
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description=AutoscalingSpec.__doc__
    )
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description=NetworkPolicySpec.__doc__
    )


# ---------------------------------------------------------------- status


class Condition(Spec):
    """A standard condition (metav1.Condition)."""

    type: str = Field(description="Ready, Progressing, Degraded or InvalidSpec.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="What happened, and what to do about it.")
    last_transition_time: str | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="Generation the condition saw.")


def _conditions() -> list[Condition]:
    return Field(  # type: ignore[no-any-return]
        default_factory=list,
        description="Current conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


HitRate = Annotated[float, Field(ge=0, le=1)]


class TierStatus(Spec):
    """One memory tier of one node's agent, as its ``/stats`` reported it."""

    capacity_bytes: int = Field(0, ge=0, description="Bytes the agent owns in this tier.")
    used_bytes: int = Field(0, ge=0, description="Bytes of this tier lent or holding blocks.")
    blocks: int = Field(0, ge=0, description="Indexed KV blocks whose home is this tier.")


class IndexHealth(Spec):
    """Health of the agent's block index and its event stream (docs/design.md "Block events")."""

    boot_id: str | None = Field(
        None, description="The agent's boot id; a change means its index restarted empty."
    )
    last_event_seq: int | None = Field(
        None, ge=0, description="Number of the last block event published this boot."
    )
    event_lag: int | None = Field(
        None,
        ge=0,
        description="Events published but not yet delivered to the slowest subscriber "
        "(empty when the agent does not report it).",
    )
    resyncs: int | None = Field(
        None,
        ge=0,
        description="Snapshots re-sent to subscribers that fell behind, this boot "
        "(empty when the agent does not report it).",
    )
    subscribers: int | None = Field(None, ge=0, description="Event subscribers (routers).")


class AgentNodeStatus(Spec):
    """One node's agent of the pool: readiness, memory per tier, blocks, hits, index health."""

    node: str = Field(description="Node the agent runs on.")
    pod: str = Field("", description="The agent pod.")
    ready: bool = Field(False, description="The pod is Ready and answered /stats.")
    reason: str = Field(
        "", description="Why the agent is not ready (e.g. Unreachable, PodNotReady)."
    )
    message: str = Field("", description="Details of the reason, and what to do.")
    device: TierStatus = Field(default_factory=TierStatus, description="Device tier.")
    host: TierStatus = Field(default_factory=TierStatus, description="Host (offload) tier.")
    blocks: int = Field(0, ge=0, description="Indexed KV blocks on the node, all tiers.")
    hit_rate: HitRate | None = Field(
        None, description="Blocks found / blocks asked for by lookups since the agent started."
    )
    sessions: int = Field(0, ge=0, description="Engines registered with the agent.")
    index: IndexHealth = Field(default_factory=IndexHealth, description=IndexHealth.__doc__)


class KVCachePoolStatus(Spec):
    """Observed state of the pool (written by the operator)."""

    observed_generation: int | None = Field(None, description="Last generation reconciled.")
    conditions: list[Condition] = _conditions()
    nodes_ready: int | None = Field(None, description="Agents ready.")
    nodes_desired: int | None = Field(None, description="Agents scheduled.")
    nodes: list[AgentNodeStatus] = Field(
        default_factory=list,
        description="Per-node agents, from their /stats (refreshed by the operator's timer).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["node"]},
    )
    blocks: int | None = Field(None, ge=0, description="Indexed KV blocks, all nodes and tiers.")
    hit_rate: HitRate | None = Field(
        None, description="Blocks found / blocks asked for, over every agent that answered."
    )
    servings: int | None = Field(None, ge=0, description="ModelServings using the pool.")


class EventStreamStatus(Spec):
    """One engine pod's own KV-event stream (vLLM), as the serving's router follows it."""

    pod: str = Field(description="The engine pod.")
    connected: bool = Field(False, description="The router is connected to its publisher.")
    live: bool = Field(
        False,
        description="The router routes the pod from its events (else from its own record "
        "of what it sent there).",
    )
    last_seq: int | None = Field(None, description="Sequence number of the last batch applied.")
    gaps: int = Field(0, ge=0, description="Sequence gaps seen (each replayed, or resynced).")
    resyncs: int = Field(
        0, ge=0, description="Gaps the pod's replay service could not fill: the index restarted."
    )
    lag_seconds: float | None = Field(
        None, ge=0, description="Age of the last batch when the router received it."
    )
    errors: dict[str, int] = Field(
        default_factory=dict,
        description="Episodes of unusable events by reason: unreachable, garbage, block_size "
        "(another block size than the pool's), silent (new blocks but no events).",
    )


class ModelServingStatus(Spec):
    """Observed state of the serving (written by the operator)."""

    observed_generation: int | None = Field(None, description="Last generation reconciled.")
    conditions: list[Condition] = _conditions()
    replicas: int | None = Field(None, description="Engine pods.")
    ready_replicas: int | None = Field(None, description="Engine pods ready.")
    selector: str | None = Field(None, description="Label selector of the engine pods (scale).")
    router_url: str | None = Field(None, description="In-cluster URL of the router Service.")
    prefix_hit_rate: HitRate | None = Field(
        None,
        description="Prompt tokens served from the KV cache / prompt tokens, summed over the "
        "ready engines since they started (from their /metrics).",
    )
    event_streams: list[EventStreamStatus] = Field(
        default_factory=list,
        description="Per engine pod, its own KV-event stream as the router follows it "
        "(vLLM engines; from the router's /health, refreshed by the operator's timer).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["pod"]},
    )
