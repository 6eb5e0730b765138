"""What the scheduler needs from a KV cache, and the simplest one (contiguous).

The scheduler speaks to a ``KVStore``: open a sequence (which may find part of
its prompt already cached — by this engine, another engine on the node, or a
peer pulled in), make room for new tokens, hand the model an ``Attention`` for
one step, commit full blocks, close. ``ContiguousStore`` implements it with no
sharing at all; ``kvmarina.engine.paged`` implements it over the agent's pages.
"""

from __future__ import annotations

from typing import Protocol

from kvmarina.engine.batch import StepBatch
from kvmarina.engine.contiguous import ContiguousKV
from kvmarina.engine.model import Attention
from kvmarina.headers import PullHint


class KVFull(RuntimeError):
    """No room for a sequence's next tokens right now (the scheduler waits or preempts)."""


class KVStore(Protocol):
    """Invariants the scheduler relies on: ``open`` returns a cached length that
    is a multiple of the block size and < the prompt length (at least one token
    is always computed, to produce logits); ``reserve`` is all-or-nothing."""

    block_size: int

    def open(
        self, seq_id: int, prompt: list[int], salt: str, pull: PullHint | None = None
    ) -> int: ...

    def reserve(self, seq_id: int, total_tokens: int) -> None: ...

    def attention(self, batch: StepBatch) -> Attention: ...

    def commit(self, seq_id: int, tokens: list[int]) -> None: ...

    def close(self, seq_id: int) -> None: ...

    def usage(self) -> dict[str, int]: ...

    def report_load(self, running: int, waiting: int) -> None:
        """Publish the engine's load where routers see it (a store without an agent
        has nowhere to: it does nothing)."""


class ContiguousStore:
    """No pages, no sharing: every prompt is computed in full."""

    def __init__(self, num_layers: int, block_size: int = 16, max_tokens: int = 1 << 20) -> None:
        self.block_size = block_size
        self.max_tokens = max_tokens
        self._kv = ContiguousKV(num_layers)
        self._reserved: dict[int, int] = {}

    def open(self, seq_id: int, prompt: list[int], salt: str, pull: PullHint | None = None) -> int:
        self._reserved[seq_id] = 0
        return 0

    def reserve(self, seq_id: int, total_tokens: int) -> None:
        others = sum(v for k, v in self._reserved.items() if k != seq_id)
        if others + total_tokens > self.max_tokens:
            raise KVFull(f"{others + total_tokens} tokens exceed the {self.max_tokens} budget")
        self._reserved[seq_id] = max(self._reserved.get(seq_id, 0), total_tokens)

    def attention(self, batch: StepBatch) -> Attention:
        return self._kv.begin(batch)

    def commit(self, seq_id: int, tokens: list[int]) -> None:
        return None

    def close(self, seq_id: int) -> None:
        self._kv.free(seq_id)
        self._reserved.pop(seq_id, None)

    def usage(self) -> dict[str, int]:
        return {"tokens_reserved": sum(self._reserved.values()), "tokens_capacity": self.max_tokens}

    def report_load(self, running: int, waiting: int) -> None:
        return None  # no agent, no routers to tell
