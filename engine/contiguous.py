"""A plain contiguous KV cache: one growing K and V tensor per sequence and layer.

This is the baseline the paged cache is measured against (``benchmarks/engine.py``)
and the oracle that engine tests compare outputs with: no pages, no agent, no
sharing — attention is torch's ``scaled_dot_product_attention`` over the whole
sequence so far.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from kvmarina.engine.batch import StepBatch


class ContiguousKV:
    """K/V per (sequence, layer), each [len, num_kv_heads, head_dim].

    Invariant: for every sequence, all layers hold the same number of tokens
    once a step has finished.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._k: dict[int, list[torch.Tensor | None]] = {}
        self._v: dict[int, list[torch.Tensor | None]] = {}
        self.batch: StepBatch | None = None

    def begin(self, batch: StepBatch) -> ContiguousKV:
        self.batch = batch
        for sid in batch.seq_ids:
            self._k.setdefault(sid, [None] * self.num_layers)
            self._v.setdefault(sid, [None] * self.num_layers)
        return self

    def free(self, seq_id: int) -> None:
        self._k.pop(seq_id, None)
        self._v.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        k = self._k.get(seq_id, [None])[0]
        return 0 if k is None else int(k.shape[0])

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        batch = self.batch
        assert batch is not None, "begin(batch) before the forward pass"
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        for sid, start, n in zip(batch.seq_ids, batch.starts, batch.new_lens, strict=True):
            ks, vs = self._append(sid, layer, k[start : start + n], v[start : start + n])
            qs = q[start : start + n].transpose(0, 1)  # [H, n, D]
            kk = ks.repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, L, D]
            vv = vs.repeat_interleave(groups, dim=1).transpose(0, 1)
            total = ks.shape[0]
            # causal with an offset: new token j sees cached tokens and new tokens <= j
            mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=total - n)
            o = scaled_dot_product_attention(qs, kk, vv, attn_mask=mask)
            out[start : start + n] = o.transpose(0, 1)
        return out

    def _append(
        self, sid: int, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self._k[sid][layer], self._v[sid][layer]
        new_k = k.clone() if old_k is None else torch.cat((old_k, k))
        new_v = v.clone() if old_v is None else torch.cat((old_v, v))
        self._k[sid][layer], self._v[sid][layer] = new_k, new_v
        return new_k, new_v
