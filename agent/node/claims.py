"""Blocks being computed right now: which engine of the node will commit each one.

Two engines of a node that get prompts with one new prefix at about the same time
would both compute it; the second finds nothing cached, since the first commits
block by block as its prefill goes. With claims, the first engine's lookup claims
the blocks it is about to compute, and the second one's lookup learns how many
blocks past its cached run another engine is computing (``pending``): it waits
for them and adopts them once committed, instead of computing them twice. That
keeps a node's hit rate independent of which of its engines a request lands on.

Claims are advisory: nothing is reserved, no slot is held. A claim ends when
anyone commits the block, when its engine gives it up (a sequence that ends
before computing it) or when the engine's session closes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvmarina.agent.node.index import Key

#: Claims one session may hold at once: a bound on the table's memory that no
#: real engine reaches (its claims are blocks of prompts it is prefilling now).
MAX_CLAIMS_PER_SESSION = 1 << 17


class ClaimTable:
    """Block key -> the session (engine) computing it.

    Invariants: every key in ``owner`` is in its session's ``by_session`` set and
    vice versa; a key is removed as soon as its block is committed (the pool calls
    ``settle``), so a claimed key is never also in the index. Claims are per
    session, not per sequence: claiming a key twice is a no-op, and a sequence
    that gives its blocks up releases them for its engine's other sequences too
    (at worst, another engine then computes a block a second time)."""

    def __init__(self) -> None:
        self.owner: dict[Key, int] = {}
        self.by_session: dict[int, set[Key]] = {}

    def __len__(self) -> int:
        return len(self.owner)

    def pending(self, session: int, keys: Sequence[Key]) -> int:
        """How many of ``keys``, from the first, other sessions are computing."""
        owner = self.owner
        if not owner:
            return 0
        n = 0
        for key in keys:
            claimer = owner.get(key)
            if claimer is None or claimer == session:
                break
            n += 1
        return n

    def claim(self, session: int, keys: Iterable[Key]) -> None:
        """``session`` will compute ``keys``: those no other session claimed are its."""
        owner = self.owner
        mine = self.by_session.setdefault(session, set())
        for key in keys:
            if key not in owner:
                if len(mine) >= MAX_CLAIMS_PER_SESSION:
                    break
                owner[key] = session
                mine.add(key)
        if not mine:
            del self.by_session[session]

    def unclaim(self, session: int, keys: Iterable[Key]) -> None:
        """``session`` will not compute ``keys`` after all; keys claimed by other
        sessions (or not at all) are ignored."""
        owner = self.owner
        mine = self.by_session.get(session)
        if not mine:
            return
        for key in keys:
            if owner.get(key) == session:
                del owner[key]
                mine.discard(key)
        if not mine:
            del self.by_session[session]

    def settle(self, key: Key) -> None:
        """The block was committed: nobody is computing it any more."""
        session = self.owner.pop(key, None)
        if session is None:
            return
        mine = self.by_session[session]
        mine.discard(key)
        if not mine:
            del self.by_session[session]

    def drop_session(self, session: int) -> None:
        """The session closed: its sequences compute nothing any more."""
        for key in self.by_session.pop(session, ()):
            del self.owner[key]
