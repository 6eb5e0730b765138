"""The paged KV cache (the engine's path) against the contiguous one (the oracle):
same logits within float tolerance, same greedy tokens, alone and batched."""

from __future__ import annotations

import pytest
import torch

from kvmarina.agent.client import LocalPool
from kvmarina.engine.batch import StepBatch
from kvmarina.engine.config import preset
from kvmarina.engine.kvstore import ContiguousStore, KVStore
from kvmarina.engine.model import LlamaForCausalLM, build_model
from kvmarina.engine.paged import PagedStore, _StepAttention
from kvmarina.hashing import HashContract


def _stores(model: LlamaForCausalLM) -> tuple[PagedStore, ContiguousStore]:
    cfg = model.config
    layout = cfg.kv_layout(16)
    pool = LocalPool(layout.bytes_per_block, 16 * 2**20)
    paged = PagedStore(pool, layout, HashContract(16), "tiny@main")
    return paged, ContiguousStore(cfg.num_layers)


def _greedy(
    model: LlamaForCausalLM, store: KVStore, prompts: list[list[int]], steps: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill every prompt in one step, then decode them together, greedily."""
    ids = tuple(range(1, len(prompts) + 1))
    for sid, p in zip(ids, prompts, strict=True):
        store.open(sid, p, "")
        store.reserve(sid, len(p) + steps + 1)
    lens = [len(p) for p in prompts]
    batch = StepBatch(ids, (0,) * len(ids), tuple(lens))
    flat = torch.tensor([t for p in prompts for t in p])
    logits = model(flat, batch.positions(), store.attention(batch), batch.last_rows())
    out: list[list[int]] = [[] for _ in prompts]
    seen = [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            out[i].append(t)
        batch = StepBatch(ids, tuple(lens), (1,) * len(ids))
        logits = model(nxt, batch.positions(), store.attention(batch), batch.last_rows())
        seen.append(logits)
        lens = [n + 1 for n in lens]
    return out, seen


@pytest.mark.parametrize(
    "prompt_lens",
    [[1], [16], [33], [3, 17, 40], [16, 16]],
    ids=["b1-one-token", "b1-one-block", "b1-33", "ragged-3", "equal-2"],
)
def test_paged_decode_matches_contiguous(prompt_lens: list[int]) -> None:
    """Decode crosses block boundaries; ragged batches take the masked path, equal
    contexts (batch 1 always) the unmasked one."""
    model = build_model(preset("tiny"), seed=5)
    gen = torch.Generator().manual_seed(len(prompt_lens))
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in prompt_lens]
    paged, contiguous = _stores(model)
    got, got_logits = _greedy(model, paged, prompts, 24)
    want, want_logits = _greedy(model, contiguous, prompts, 24)
    assert got == want
    for g, w in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_step_metadata_reads_only_the_blocks_in_use() -> None:
    """Block tables are as wide as the longest context needs, not the reservation."""
    model = build_model(preset("tiny"), seed=5)
    paged, _ = _stores(model)
    paged.open(1, [1] * 20, "")
    paged.reserve(1, 20 + 200)  # 14 blocks reserved
    paged.open(2, [2] * 3, "")
    paged.reserve(2, 3 + 200)
    step = paged.attention(StepBatch((1, 2), (20, 3), (1, 1)))
    assert isinstance(step, _StepAttention)
    assert step.block_tables.shape == (2, 2)  # 21 tokens -> 2 blocks; 4 tokens -> 1
    assert step.block_tables[0].tolist() == paged.seqs[1].block_ids[:2]
    assert step.block_tables[1, 0] == paged.seqs[2].block_ids[0]
    assert step.ctx_lens.tolist() == [21, 4]
    bsz = paged.block_size
    assert step.slot_mapping.tolist() == [
        paged.seqs[1].block_ids[1] * bsz + 4,
        paged.seqs[2].block_ids[0] * bsz + 3,
    ]
    assert step.decode_only
