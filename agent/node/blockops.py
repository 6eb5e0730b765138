"""Operations on a serving's *own* blocks, for clients that keep named values in
the pool (``kvmarina.Cache``) rather than prefix KV: drop, commit-with-replace,
probe, counts by tag, and eviction of its own blocks when it reaches its max.

Invariants these keep (beside the pool's):

* a pinned block is never removed: ``drop`` reports it busy and leaves it,
  ``replace`` refuses with ``Busy`` (the caller retries once readers let go);
* only the serving that committed a block (its ``owner``) may drop or replace
  it: a scope is shared for reading, not for removing others' blocks;
* every check comes before any change (a refused request changes nothing);
* a replaced hash is never bound to two blocks: the old block leaves the index
  before the new one enters, in one step of the agent's single thread.

``peek`` hands back the first bytes of a block (at most ``MAX_PEEK``): small
metadata (a value's header), never a value's bytes, which clients read from
their own mapping of the shared pages.
"""

from __future__ import annotations

import heapq
import itertools

from kvmarina.agent.node.index import Block, Slot
from kvmarina.agent.node.pool import Location, Pool, PoolError, Session

MAX_PEEK = 4096


class Busy(PoolError):
    """The block is pinned by a reader right now: retry shortly."""


def evict_own(pool: Pool, sess: Session, k: int, prefer: list[bytes]) -> int:
    """Drop up to ``k`` of the serving's own unpinned device blocks: those named in
    ``prefer`` first, then in the session's ``evict_own`` order (least recently
    used; or fewest uses, ties least recently used). One ``evicted`` event."""
    me, blocks = sess.ident.key, pool.index.blocks
    victims: list[Block] = []
    chosen: set[tuple[str, bytes]] = set()
    for h in prefer:
        b = blocks.get((sess.scope, h))
        usable = b is not None and b.owner == me and b.refs == 0 and b.tier == "device"
        if b is not None and usable and b.key not in chosen and len(victims) < k:
            victims.append(b)
            chosen.add(b.key)
    replaced = len(victims)
    if len(victims) < k:
        victims += _own_order(pool, me, sess.evict_own, k - len(victims), chosen)
    for i, b in enumerate(victims):
        # the value being replaced is not counted as an eviction
        pool.remove(b, evicted=i >= replaced, publish=False)
    if victims:
        pool.events.publish("evicted", tuple(b.key[1] for b in victims))
    pool.stats["evicted_own"] += len(victims) - replaced
    return len(victims)


def _own_order(
    pool: Pool, owner: str, policy: str, k: int, skip: set[tuple[str, bytes]]
) -> list[Block]:
    """The ``k`` best victims among ``owner``'s unpinned device blocks (chosen
    before anything changes: the order is not touched while iterated)."""
    blocks = pool.index.blocks
    own = (
        b
        for key in pool.index.recency("device")
        if key not in skip and (b := blocks.get(key)) is not None and b.owner == owner
    )
    if policy == "lru":
        return list(itertools.islice(own, k))
    ranked = [(b.uses, rank, b) for rank, b in enumerate(own)]
    return [b for _, _, b in heapq.nsmallest(k, ranked, key=lambda t: (t[0], t[1]))]


def _peek(pool: Pool, block: Block, n: int) -> bytes:
    return bytes(pool.host_view(block)[: min(n, MAX_PEEK)])


def _check_owner(sess: Session, block: Block | None) -> None:
    if block is not None and block.owner != sess.ident.key:
        raise PoolError(
            f"block {block.key[1].hex()} belongs to serving {block.owner}; "
            f"only its owner may remove or replace it"
        )


def drop(
    pool: Pool, sess: Session, hashes: list[bytes], peek: int = 0
) -> tuple[list[bytes], list[bytes], list[bytes | None]]:
    """Remove named blocks of the session's scope. Returns (removed, busy, peeked):
    pinned blocks stay and are listed as busy; absent ones are skipped; ``peeked[i]``
    is the first ``peek`` bytes of ``hashes[i]``'s block if it was removed."""
    blocks, scope = pool.index.blocks, sess.scope
    for h in hashes:
        _check_owner(sess, blocks.get((scope, h)))
    removed: list[bytes] = []
    busy: list[bytes] = []
    peeked: list[bytes | None] = []
    for h in hashes:
        b = blocks.get((scope, h))
        if b is None or b.refs > 0:
            if b is not None:
                busy.append(h)
            peeked.append(None)
            continue
        peeked.append(_peek(pool, b, peek) if peek else None)
        pool.remove(b, evicted=False, publish=False)
        removed.append(h)
    if removed:
        pool.events.publish("evicted", tuple(removed))
    pool.stats["dropped"] += len(removed)
    return removed, busy, peeked


def replace(
    pool: Pool, sess: Session, slot: Slot, block_hash: bytes, tag: bytes = b"", peek: int = 0
) -> tuple[Location, bytes | None]:
    """Commit one leased slot under ``block_hash``, replacing the block bound to
    that hash (owned by this serving, unpinned). Returns the location and the first
    ``peek`` bytes of the replaced block (``None`` when there was none)."""
    pool.check_leased(sess, [slot])
    old = pool.index.blocks.get((sess.scope, block_hash))
    _check_owner(sess, old)
    replaced = None
    if old is not None:
        if old.refs > 0:
            raise Busy(f"block {block_hash.hex()} is being read; retry shortly")
        replaced = _peek(pool, old, peek) if peek else b""
        pool.remove(old, evicted=False)
    loc = pool.commit(sess, slot, block_hash, publish=False, tag=tag)
    pool.events.publish("stored", (block_hash,), "device")
    return loc, replaced


def probe(
    pool: Pool, sess: Session, hashes: list[bytes], peek: int = 0
) -> tuple[int, bytes | None]:
    """How many of ``hashes`` are present from the first (same block size), without
    pinning or counting a use; with ``peek``, the first block's first bytes."""
    blocks, n = pool.index.blocks, 0
    for h in hashes:
        b = blocks.get((sess.scope, h))
        if b is None or b.block_bytes != sess.block_bytes:
            break
        n += 1
    first = blocks.get((sess.scope, hashes[0])) if n and peek else None
    return n, (_peek(pool, first, peek) if first is not None else None)


def tag_counts(pool: Pool, sess: Session, tags: list[bytes]) -> list[tuple[int, int]]:
    """Per tag: (blocks of the session's scope carrying it now, blocks with it the
    pool has evicted since boot). A scan: for stats, not hot paths."""
    want = set(tags)
    held = dict.fromkeys(want, 0)
    for (scope, _), b in pool.index.blocks.items():
        if scope == sess.scope and b.tag in want:
            held[b.tag] += 1
    return [(held[t], pool.tag_evictions.get((sess.scope, t), 0)) for t in tags]
