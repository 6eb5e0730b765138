"""The headers the router sets for an engine (the router -> engine contract), and the one
format of the pull hint: the router, kvmarina's engine and its simulator use these.

``x-kvmarina-salt``
    The tenant salt the engine hashes with. Set by the router only: any value a
    client sent is removed before the request is forwarded (a client salt is
    folded into the router's salt when the serving allows it, never passed raw).

``x-kvmarina-pull``
    Sent when the router estimates that pulling cached blocks from a peer node is
    cheaper than recomputing them. Format (``;``-separated ``key=value`` pairs,
    keys in this order, no spaces)::

        node=<peer node>;agent=<peer agent url>;blocks=<n>

    ``blocks`` is the number of leading blocks of the prompt (from block 0) the
    peer holds. Node names are DNS-label-like (no ``;`` ``=`` or spaces); the
    agent URL is an http(s) URL without ``;``. ``parse_pull_hint`` accepts the
    pairs in any order and ignores unknown keys, so the format can grow.
"""

from __future__ import annotations

from dataclasses import dataclass

SALT_HEADER = "x-kvmarina-salt"
PULL_HEADER = "x-kvmarina-pull"


class PullHintError(ValueError):
    """A pull-hint header value that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class PullHint:
    """Pull ``blocks`` leading blocks from ``agent`` (the agent of ``node``).

    Invariants: ``node`` and ``agent`` are non-empty and contain no ``;``;
    ``node`` contains no ``=``; ``blocks >= 1``.
    """

    node: str
    agent: str
    blocks: int

    def __post_init__(self) -> None:
        for key, value in (("node", self.node), ("agent", self.agent)):
            if not value or ";" in value or any(c.isspace() for c in value):
                raise PullHintError(f"pull hint {key} {value!r} must be non-empty, no ';'/space")
        if "=" in self.node:
            raise PullHintError(f"pull hint node {self.node!r} must not contain '='")
        if not isinstance(self.blocks, int) or self.blocks < 1:
            raise PullHintError(f"pull hint blocks must be a positive integer, got {self.blocks!r}")

    def format(self) -> str:
        return format_pull_hint(self)


def format_pull_hint(hint: PullHint) -> str:
    return f"node={hint.node};agent={hint.agent};blocks={hint.blocks}"


def parse_pull_hint(value: str) -> PullHint:
    """Parse ``node=..;agent=..;blocks=..``; ``PullHintError`` naming what is wrong."""
    fields: dict[str, str] = {}
    for part in value.strip().split(";"):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise PullHintError(f"pull hint part {part!r} is not key=value")
        fields[key.strip()] = val.strip()
    missing = [k for k in ("node", "agent", "blocks") if k not in fields]
    if missing:
        raise PullHintError(f"pull hint {value!r} lacks {', '.join(missing)}")
    try:
        blocks = int(fields["blocks"])
    except ValueError as exc:
        raise PullHintError(f"pull hint blocks {fields['blocks']!r} is not an integer") from exc
    return PullHint(fields["node"], fields["agent"], blocks)
