"""One forward step's worth of work: which sequences, how many new tokens each.

A step concatenates the new tokens of several sequences — prefill chunks and
single decode tokens alike — into one flat batch of T tokens. ``StepBatch``
records the boundaries so attention can keep the sequences apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Invariants: all lists have one entry per sequence; ``new_lens[i] >= 1``;
    sequence i's new tokens sit at flat rows ``starts[i] : starts[i] + new_lens[i]``
    and have positions ``cached_lens[i] .. cached_lens[i] + new_lens[i] - 1``."""

    seq_ids: tuple[int, ...]
    cached_lens: tuple[int, ...]
    new_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.seq_ids) == len(self.cached_lens) == len(self.new_lens)):
            raise ValueError("StepBatch fields must have one entry per sequence")
        if any(n < 1 for n in self.new_lens):
            raise ValueError("every sequence in a step needs at least one new token")

    @property
    def num_tokens(self) -> int:
        return sum(self.new_lens)

    @property
    def starts(self) -> list[int]:
        out, acc = [], 0
        for n in self.new_lens:
            out.append(acc)
            acc += n
        return out

    def positions(self) -> torch.Tensor:
        parts = [
            torch.arange(c, c + n) for c, n in zip(self.cached_lens, self.new_lens, strict=True)
        ]
        return torch.cat(parts).to(torch.int64)

    def last_rows(self) -> torch.Tensor:
        """Flat row of each sequence's last new token (where its logits come from)."""
        return torch.tensor(
            [s + n - 1 for s, n in zip(self.starts, self.new_lens, strict=True)], dtype=torch.int64
        )
