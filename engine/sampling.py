"""Sampling parameters of a request and the choice of the next token.

Greedy when ``temperature == 0``; otherwise temperature + nucleus (top-p)
sampling from a per-request ``torch.Generator``, so a request with a ``seed``
gets the same tokens every time, whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class SamplingError(ValueError):
    """A sampling parameter out of range; ``param`` names it (OpenAI error field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Invariants: ``max_tokens >= 1``; ``0 <= temperature <= 2``; ``0 < top_p <= 1``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def from_request(cls, body: dict[str, Any], default_max: int = 16) -> SamplingParams:
        """Parse the OpenAI fields; ``SamplingError`` naming the bad one."""
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max))
        if max_tokens is None:
            max_tokens = default_max
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise SamplingError(
                "max_tokens", f"max_tokens must be an integer >= 1, got {max_tokens!r}"
            )
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise SamplingError("top_p", "top_p must be > 0 and <= 1")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise SamplingError("seed", f"seed must be an integer, got {seed!r}")
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif (
            isinstance(stop, list)
            and all(isinstance(s, str) and s for s in stop)
            and len(stop) <= 4
        ):
            stops = tuple(stop)
        else:
            raise SamplingError(
                "stop", "stop must be a string or a list of up to 4 non-empty strings"
            )
        return cls(max_tokens, temperature, top_p, seed, stops, bool(body.get("ignore_eos", False)))


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise SamplingError(
            name, f"{name} must be a number between {lo:g} and {hi:g}, got {value!r}"
        )
    return float(value)


@dataclass
class Sampler:
    """Per-request sampling state (the generator advances with every token)."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        seed = self.params.seed
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def next_token(self, logits: torch.Tensor) -> int:
        """``logits``: [vocab] float32 for this sequence's last position."""
        p = self.params
        if p.temperature == 0.0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
