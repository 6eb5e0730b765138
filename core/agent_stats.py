"""The node agent's ``/stats`` document: one typed contract for the agent that writes it and
the operator (and tests, benchmarks) that read it.

On the wire it is a JSON object (``to_wire``): ``node``, ``boot_id``, ``seq`` (the last
block event's number this boot), ``pages`` per tier (``total``, ``used``, and on the
device ``kept``: free pages whose memory stays mapped for their last scope), ``blocks``
per tier, ``sessions``, ``claimed_blocks``, ``reserved_pages``, ``usage`` (slots per
serving), ``stats`` (the pool's counters: ``hit_blocks``, ``miss_blocks``, ...),
``subscribers``, ``event_lag``, ``resyncs``, and whatever the agent's other parts add
(``transfer``, ...), kept as they are under ``extra``. ``from_wire`` checks every
figure and names the first that is missing or not a count; the event figures are
optional (agents before them leave them out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TIERS = ("device", "host")
#: the document's own keys; anything else is another part's (``extra``)
WIRE_KEYS = frozenset(
    ("node", "boot_id", "seq", "pages", "blocks", "sessions", "claimed_blocks", "reserved_pages",
     "usage", "stats", "subscribers", "event_lag", "resyncs")
)  # fmt: skip


class StatsError(ValueError):
    """A ``/stats`` document that is not what an agent writes; the message names the field."""


@dataclass(frozen=True, slots=True)
class TierPages:
    """One tier's pages: ``used <= total``; ``kept`` counts free device pages."""

    total: int
    used: int
    kept: int = 0


@dataclass(frozen=True, slots=True)
class AgentStats:
    node: str
    boot_id: str
    seq: int
    pages: dict[str, TierPages]
    blocks: dict[str, int]
    sessions: int = 0
    claimed_blocks: int = 0
    reserved_pages: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    subscribers: int | None = None
    event_lag: int | None = None
    resyncs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_blocks(self) -> int:
        return self.counters.get("hit_blocks", 0)

    @property
    def asked_blocks(self) -> int:
        """Blocks looked up: hits and misses."""
        return self.hit_blocks + self.counters.get("miss_blocks", 0)

    def to_wire(self) -> dict[str, Any]:
        pages: dict[str, dict[str, int]] = {}
        for tier, p in self.pages.items():
            pages[tier] = {"total": p.total, "used": p.used}
            if tier == "device":
                pages[tier]["kept"] = p.kept
        doc: dict[str, Any] = {
            "node": self.node,
            "boot_id": self.boot_id,
            "seq": self.seq,
            "pages": pages,
            "blocks": dict(self.blocks),
            "sessions": self.sessions,
            "claimed_blocks": self.claimed_blocks,
            "reserved_pages": self.reserved_pages,
            "usage": dict(self.usage),
            "stats": dict(self.counters),
        }
        for key in ("subscribers", "event_lag", "resyncs"):
            if (value := getattr(self, key)) is not None:
                doc[key] = value
        return {**doc, **self.extra}

    @classmethod
    def from_wire(cls, doc: Any) -> AgentStats:
        if not isinstance(doc, dict):
            raise StatsError(f"/stats answered {type(doc).__name__}, not an object")
        pages = {}
        for tier in TIERS:
            total, used = _count(doc, "pages", tier, "total"), _count(doc, "pages", tier, "used")
            has_kept = tier == "device" and "kept" in doc["pages"][tier]
            kept = _count(doc, "pages", tier, "kept") if has_kept else 0
            pages[tier] = TierPages(total, used, kept)
        counters = doc.get("stats", {})
        if not isinstance(counters, dict):
            raise StatsError(f"/stats stats is {counters!r}, not an object")
        usage = doc.get("usage", {})
        if not isinstance(usage, dict):
            raise StatsError(f"/stats usage is {usage!r}, not an object")
        boot = doc.get("boot_id")
        return cls(
            node=str(doc.get("node", "")),
            boot_id=boot if isinstance(boot, str) else "",
            seq=_count(doc, "seq"),
            pages=pages,
            blocks={tier: _count(doc, "blocks", tier) for tier in TIERS},
            sessions=_optional(doc, "sessions") or 0,
            claimed_blocks=_optional(doc, "claimed_blocks") or 0,
            reserved_pages=_optional(doc, "reserved_pages") or 0,
            usage={str(k): _count(usage, k) for k in usage},
            counters={str(k): _count(counters, k) for k in counters},
            subscribers=_optional(doc, "subscribers"),
            event_lag=_optional(doc, "event_lag"),
            resyncs=_optional(doc, "resyncs"),
            extra={k: v for k, v in doc.items() if k not in WIRE_KEYS},
        )


def _count(doc: Any, *keys: str) -> int:
    """An integer at ``doc[k0][k1]...``; ``StatsError`` naming the path otherwise."""
    for k in keys:
        if not isinstance(doc, dict) or k not in doc:
            raise StatsError(f"/stats has no {'.'.join(keys)}")
        doc = doc[k]
    if isinstance(doc, bool) or not isinstance(doc, int) or doc < 0:
        raise StatsError(f"/stats {'.'.join(keys)} is {doc!r}, not a count")
    return doc


def _optional(doc: dict[str, Any], key: str) -> int | None:
    """A count that older agents leave out: ``None`` when absent, checked when present."""
    return _count(doc, key) if key in doc else None
