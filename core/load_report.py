"""The load report an engine sends with every response (the contract of engine and router).

``x-kvmarina-load: running=<n>;waiting=<n>;queued=<prompt tokens>``: sequences the
engine has scheduled (decoding, or prefilling now), requests queued for their prefill,
and the prompt tokens still to prefill (cache hits excluded; optional). A router
that is one of several replicas learns from it what the others sent the engine.

``x-kvmarina-ahead: <prompt tokens>``: an engine that sends a stream's head as it takes
the request (before the prefill) may say how much prefill is ahead of it there. Router
replicas that share nothing can send prompts to the same idle engine within a
millisecond of each other; the one whose request found the other's ahead of it may
close it before it starts (the engine drops a request whose client went away) and send
it to the next pod.
"""

from __future__ import annotations

from dataclasses import dataclass

LOAD_HEADER = "x-kvmarina-load"
AHEAD_HEADER = "x-kvmarina-ahead"


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: int
    waiting: int
    queued_tokens: int | None = None  # prompt tokens still to prefill (when reported)


def format_load(load: EngineLoad) -> str:
    out = f"running={load.running};waiting={load.waiting}"
    return out if load.queued_tokens is None else f"{out};queued={load.queued_tokens}"


def parse_load_header(value: str | None) -> EngineLoad | None:
    """The header's figures; ``None`` when absent or unreadable (never an error: an
    engine's report only refines routing)."""
    if not value:
        return None
    fields = dict(part.partition("=")[::2] for part in value.split(";"))
    try:
        queued = fields.get("queued")
        return EngineLoad(
            int(fields["running"]), int(fields["waiting"]), None if queued is None else int(queued)
        )
    except (KeyError, ValueError):
        return None
