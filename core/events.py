"""Block events: the agent -> router contract (docs/design.md "Block events").

Every agent numbers its events per boot: ``(boot_id, seq)`` with ``seq``
strictly increasing by one. A subscriber first receives a ``Snapshot`` of the
agent's whole index (carrying the ``seq`` it is current to), then each event
with ``seq = snapshot.seq + 1, + 2, ...``. A subscriber that sees a gap, a new
``boot_id`` or a ``Resync`` marker discards what it learned from that agent and
waits for the next snapshot.

On the wire (HTTP ``GET /v1/events`` on the agent, streamed body) each record is
one frame of ``kvmarina.framing``: a msgpack map with a ``type`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kvmarina.load_report import EngineLoad

TIERS = ("device", "host")
Tier = Literal["device", "host"]
EVENT_TYPES = ("stored", "moved", "evicted", "cleared")


class EventError(ValueError):
    """A record that is not a valid block event."""


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """One change to an agent's index.

    ``stored``/``moved`` carry a ``tier``; ``evicted`` carries hashes only;
    ``cleared`` carries neither (the whole index is gone).
    """

    type: str
    boot_id: str
    seq: int
    hashes: tuple[bytes, ...] = ()
    tier: str | None = None

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise EventError(f"unknown event type {self.type!r}; allowed: {', '.join(EVENT_TYPES)}")
        if self.type in ("stored", "moved") and self.tier not in TIERS:
            raise EventError(f"{self.type} event needs a tier in {TIERS}, got {self.tier!r}")
        if self.seq < 0:
            raise EventError(f"event seq must be >= 0, got {self.seq}")

    def to_wire(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"type": self.type, "boot_id": self.boot_id, "seq": self.seq}
        if self.hashes:
            rec["hashes"] = list(self.hashes)
        if self.tier is not None:
            rec["tier"] = self.tier
        return rec


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole index of one agent as of ``seq``: hash -> tier."""

    boot_id: str
    seq: int
    node: str
    blocks: dict[bytes, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "snapshot",
            "boot_id": self.boot_id,
            "seq": self.seq,
            "node": self.node,
            "blocks": [[h, t] for h, t in self.blocks.items()],
        }


@dataclass(frozen=True, slots=True)
class Resync:
    """Sent to a subscriber that fell behind: a snapshot follows."""

    boot_id: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "resync", "boot_id": self.boot_id, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class LoadRecord:
    """An engine's load as it changes, pushed on its node's stream (not numbered: it
    changes no index, and a later report replaces it, so one may be dropped). Router
    replicas share nothing; each sees every request the others send an engine as soon
    as the engine takes it, not at its next answer (``kvmarina.load_report``)."""

    pod: str  # the engine's pod name ("" when the node runs only one engine)
    running: int
    waiting: int
    queued_tokens: int | None = None

    @classmethod
    def of(cls, pod: str, load: EngineLoad) -> LoadRecord:
        return cls(pod, load.running, load.waiting, load.queued_tokens)

    @property
    def load(self) -> EngineLoad:
        """The figures as the engine's answers report them (``kvmarina.load_report``)."""
        return EngineLoad(self.running, self.waiting, self.queued_tokens)

    def to_wire(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "type": "load",
            "pod": self.pod,
            "running": self.running,
            "waiting": self.waiting,
        }
        if self.queued_tokens is not None:
            rec["queued"] = self.queued_tokens
        return rec


Record = BlockEvent | Snapshot | Resync | LoadRecord


def from_wire(rec: Any) -> Record:
    """Parse one decoded frame; ``EventError`` on anything malformed."""
    if not isinstance(rec, dict) or "type" not in rec:
        raise EventError("event record must be a map with a 'type'")
    kind = rec["type"]
    try:
        if kind == "snapshot":
            blocks = {bytes(h): str(t) for h, t in rec.get("blocks", [])}
            return Snapshot(str(rec["boot_id"]), int(rec["seq"]), str(rec.get("node", "")), blocks)
        if kind == "resync":
            return Resync(str(rec["boot_id"]), str(rec.get("reason", "")))
        if kind == "load":
            queued = rec.get("queued")
            return LoadRecord(
                str(rec.get("pod", "")),
                int(rec["running"]),
                int(rec["waiting"]),
                None if queued is None else int(queued),
            )
        return BlockEvent(
            type=str(kind),
            boot_id=str(rec["boot_id"]),
            seq=int(rec["seq"]),
            hashes=tuple(bytes(h) for h in rec.get("hashes", ())),
            tier=rec.get("tier"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, EventError):
            raise
        raise EventError(f"malformed {kind!r} record: {exc!r}") from exc
