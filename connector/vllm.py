"""``KVMarinaConnector``: vLLM's KV connector onto the node agent's pool.

Load it with::

    --kv-transfer-config '{"kv_connector": "KVMarinaConnector",
        "kv_connector_module_path": "kvmarina.connector.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {...}}'     # see kvmarina.connector.settings

(the operator and ``kvmarina up`` write it from the ModelServing). In vLLM's scheduler
process the connector asks the agent how many of a new request's prompt blocks it holds
beyond vLLM's own prefix cache (one lookup; the pool's hashes from the token ids and
the request's ``cache_salt``), and plans each step's loads and saves
(``kvmarina.connector.plan``). In the worker it copies those blocks from the agent's
shared pages into vLLM's paged KV before the forward pass, and the blocks that became
full after it into leased pages, committed to the agent (which checksums them and
publishes their ``stored`` events) on a thread of its own, so decode does not wait on the
agent (``kvmarina.connector.saver``: vLLM keeps a finished request's blocks until its saves
are over). A router's pull hint rides in the request's
``kv_transfer_params`` (``{"kvmarina_pull": {"agent", "node", "blocks"}}``): the agent
pulls those blocks from the peer node first, beside the scheduler
(``kvmarina.connector.puller``: the request waits, the engine does not). Without an
agent, vLLM computes everything itself (``kvmarina.connector.agent_session``); a block
the worker cannot read from the agent that the scheduler saw is reported as a load
error, and vLLM recomputes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvmarina.connector.agent_session import AgentSession
from kvmarina.connector.kv_blocks import LayoutMismatch, PagedKV, load_blocks, save_blocks
from kvmarina.connector.plan import Planner, StepPlan
from kvmarina.connector.puller import Puller, PullJob
from kvmarina.connector.saver import BlockSaver
from kvmarina.connector.settings import ConnectorSettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvmarina.connector")
PULL_KEY = "kvmarina_pull"  # the same key as kvmarina.router.vllm_request.PULL_KEY


class KVMarinaMetadata(KVConnectorMetadata):
    """One step's plan, sent from the scheduler process to the worker."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def block_bytes_of(config: KVCacheConfig) -> int:
    """Bytes of one block over every attention layer (the agent's block size)."""
    total = 0
    for group in config.kv_cache_groups:
        total += group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total


class KVMarinaConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.settings = ConnectorSettings.parse(extra, str(vllm_config.model_config.model))
        assert kv_cache_config is not None, "vLLM passes the KV cache config to connectors"
        self.session = AgentSession(
            self.settings, block_bytes_of(kv_cache_config), role.name.lower()
        )
        self.planner = Planner(self.settings.contract, self.settings.model_identity, self.session)
        # pulls on a connection of their own, beside the scheduler (kvmarina.connector.puller)
        self.puller = Puller(
            AgentSession(self.settings, self.session.block_bytes, "pull"),
            self.settings.pull_timeout_s,
        )
        self.kv: PagedKV | None = None
        self.saver = BlockSaver(None)  # records requests until register_kv_caches
        self._load_errors: set[int] = set()
        log.info(
            "kvmarina connector (%s): agent %s, identity %s, blocks of %d bytes",
            role.name.lower(), self.settings.agent_socket, self.settings.model_identity,
            self.session.block_bytes,
        )  # fmt: skip

    # ------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = request.prompt_token_ids or []
        salt = request.cache_salt or self.settings.default_salt
        rid = request.request_id
        if rid not in self.puller:
            self.puller.start(rid, self._pull_job(request, tokens, salt))
        if self.puller.busy(rid):
            return None, False  # the agent is pulling its prefix from a peer: ask again
        n = self.planner.matched(rid, tokens, salt, num_computed_tokens)
        return n, False

    def _pull_job(self, request: Request, tokens: list[int], salt: str) -> PullJob | None:
        """The pull a router hinted in ``kv_transfer_params``, as far as it can help."""
        params = request.kv_transfer_params or {}
        hint = params.get(PULL_KEY) if isinstance(params, dict) else None
        if not isinstance(hint, dict) or not hint.get("agent"):
            return None
        bs = self.settings.contract.block_size
        blocks = min(int(hint.get("blocks", 0)), max(0, (len(tokens) - 1) // bs))
        if blocks <= 0:
            return None
        hashes = self.settings.contract.block_hashes(
            tokens[: blocks * bs], self.settings.model_identity, salt
        )
        node = hint.get("node")
        return PullJob(str(hint["agent"]), str(node) if node else None, hashes)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.planner.allocated(request.request_id, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        new = [
            (r.req_id, r.block_ids[0], r.num_computed_tokens)
            for r in scheduler_output.scheduled_new_reqs
        ]
        c = scheduler_output.scheduled_cached_reqs
        cached = [
            (
                req_id,
                c.new_block_ids[i][0] if c.new_block_ids[i] is not None else None,
                c.num_computed_tokens[i],
                req_id in c.resumed_req_ids,
            )
            for i, req_id in enumerate(c.req_ids)
        ]
        preempted = frozenset(scheduler_output.preempted_req_ids or ())
        plan = self.planner.step(new, cached, scheduler_output.num_scheduled_tokens, preempted)
        return KVMarinaMetadata(plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.planner.step_done()
        self.planner.sends_done(connector_output.finished_sending or ())

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self.puller.forget(request.request_id)
        # True keeps the blocks until the worker's saves of them are over (get_finished)
        return self.planner.finished(request.request_id), None

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._kv_cache_config is not None
        try:
            kv = PagedKV(kv_caches, self._kv_cache_config.num_blocks)
        except LayoutMismatch as exc:
            log.warning("kvmarina connector off: %s", exc)
            return
        if kv.block_bytes != self.session.block_bytes:
            log.warning(
                "kvmarina connector off: vLLM's KV tensors hold %d bytes a block, the "
                "KV cache config %d", kv.block_bytes, self.session.block_bytes,
            )  # fmt: skip
            return
        self.kv = kv
        self.saver = BlockSaver(self._store)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        plan = self._plan()
        if plan is not None and plan.preempted:
            # a preempted request's blocks are free again: this step may write them
            self.saver.wait_for(plan.preempted)

    def _plan(self) -> StepPlan | None:
        if self.kv is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KVMarinaMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is None or not plan.loads or self.kv is None:
            return
        client = self.session.connect()
        if client is None or self.session.boot_id != plan.boot_id:
            # not the agent (or not the boot) whose pages the scheduler found: recompute
            self._load_errors.update(block_id for block_id, _, _ in plan.loads)
            return
        load_blocks(self.kv, plan.loads, client.block)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved once the forward pass is over (wait_for_save)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if isinstance(meta, KVMarinaMetadata) and meta.plan.saves:
            self.saver.submit(meta.plan.saves, self._forward_written())

    def _forward_written(self) -> Callable[[], None] | None:
        """On CUDA, an event the save thread waits on: the forward pass's KV writes are
        queued on this thread's stream, not done, when ``wait_for_save`` runs."""
        if self.kv is None or not self.kv.layers[0].is_cuda:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event.synchronize

    def _store(self, saves: Sequence[tuple[int, bytes]]) -> None:
        """The save thread's part: lease pages, copy the blocks in, commit them."""
        kv = self.kv
        assert kv is not None

        def save(client: Any) -> None:
            slots = client.lease(len(saves))
            save_blocks(kv, [b for b, _ in saves], slots, client.block)
            items = [(p, i, h) for (p, i), (_, h) in zip(slots, saves, strict=True)]
            placed = client.commit(items)
            client.release([hit.hash for hit in placed])

        self.session.call(save, None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.saver.finished_sending(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.saver.close()
        self.puller.close()
        self.session.close()
