"""vLLM's own KV events, read into the router's block index (pure: no sockets).

A vLLM pod started with ``--kv-events-config`` publishes batches over ZMQ; each
payload is msgpack ``[timestamp, [event, ...], data_parallel_rank]``. Events are maps
tagged by ``type`` (vLLM >= 0.11) or arrays whose first element is the tag (earlier
releases): ``BlockStored`` (``block_hashes``, ``parent_block_hash``, ``token_ids``,
``block_size``, ``medium``, ``extra_keys``), ``BlockRemoved`` (``block_hashes``,
``medium``) and ``AllBlocksCleared``.

vLLM names a block by a hash of its own (seeded per process, never equal to the
pool's). The events carry each block's token ids and its parent, so the pool's
contract hash follows from the parent's: ``ours(b) = H(ours(parent(b)), tokens(b))``,
the first block seeded by the model identity and the request's ``cache_salt`` (the
router sets it; vLLM reports it in the first block's ``extra_keys``). ``PodBlocks``
keeps vLLM's hash -> ours for the removals, which name vLLM's hashes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from kvmarina.hashing import HashContract
from kvmarina.router.hashmemo import HashMemo
from kvmarina.router.index import DEVICE, HOST, BlockIndex

EngineHash = bytes | int  # vLLM's ExternalBlockHash
#: vLLM's ``medium`` -> the router's tier; media not listed (remote storage) are ignored
TIERS = {None: DEVICE, "GPU": DEVICE, "CPU": HOST}


class EventFormatError(ValueError):
    """A batch the router cannot read; ``reason`` labels the metric (``garbage``: not
    vLLM's format; ``block_size``: blocks of another size than the pool's contract)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Stored:
    hashes: list[EngineHash]
    parent: EngineHash | None
    tokens: list[int]
    block_size: int
    medium: str | None
    salt: str
    group: int


@dataclass(frozen=True, slots=True)
class Removed:
    hashes: list[EngineHash]
    medium: str | None
    group: int


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared
_ARRAY_FIELDS = {  # positional fields of the array form (vLLM < 0.11)
    "BlockStored": (
        "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}  # fmt: skip


def decode_batch(payload: bytes) -> tuple[float, list[Event]]:
    """One published batch -> (vLLM's timestamp, events); ``EventFormatError`` otherwise."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventFormatError("garbage", f"payload is not msgpack: {exc}") from None
    if not (isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[1], list)):
        raise EventFormatError("garbage", "a batch must be [timestamp, [event, ...], ...]")
    ts = batch[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise EventFormatError("garbage", f"batch timestamp {ts!r} is not a number")
    return float(ts), [_event(e) for e in batch[1]]


def _fields(raw: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        return str(raw.get("type")), raw
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        names = _ARRAY_FIELDS.get(raw[0])
        if names is not None:
            return raw[0], dict(zip(names, raw[1:], strict=False))
    raise EventFormatError("garbage", f"unreadable event {str(raw)[:80]}")


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list) or not all(
        isinstance(h, bytes | int) and not isinstance(h, bool) for h in value
    ):
        raise EventFormatError("garbage", "block_hashes must be a list of ints or bytes")
    return value


def _event(raw: Any) -> Event:
    kind, f = _fields(raw)
    group = f.get("group_idx") or 0
    if kind == "BlockStored":
        tokens, size, parent = f.get("token_ids"), f.get("block_size"), f.get("parent_block_hash")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise EventFormatError("garbage", "BlockStored.token_ids must be a list of ints")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise EventFormatError("garbage", f"BlockStored.block_size {size!r} is not valid")
        if parent is not None and not isinstance(parent, bytes | int):
            raise EventFormatError("garbage", "BlockStored.parent_block_hash is not a hash")
        return Stored(
            _hashes(f.get("block_hashes")), parent, tokens, size, f.get("medium"),
            _salt(f.get("extra_keys")), group,
        )  # fmt: skip
    if kind == "BlockRemoved":
        return Removed(_hashes(f.get("block_hashes")), f.get("medium"), group)
    if kind == "AllBlocksCleared":
        return Cleared()
    raise EventFormatError("garbage", f"unknown event type {kind!r}")


def _salt(extra_keys: Any) -> str:
    """The first block's ``cache_salt`` (the last string of its extra keys: a LoRA name
    and multimodal keys come before it); '' when the request had none."""
    if not isinstance(extra_keys, list) or not extra_keys:
        return ""
    first = extra_keys[0]
    if not isinstance(first, list | tuple):
        return ""
    strings = [k for k in first if isinstance(k, str)]
    return strings[-1] if strings else ""


class PodBlocks:
    """One vLLM pod's cached blocks, named by the pool's contract, kept in ``index``
    under ``domain``.

    Invariants: ``_ours`` and ``_media`` have the same keys (vLLM hashes of blocks the
    pod holds in at least one tracked medium); the index holds ``_ours[h]`` under
    ``domain`` for each, in the host tier only when no device copy is held. A block
    whose parent was never seen (an event lost before this router followed the pod)
    cannot be named and is counted in ``orphans``.
    """

    def __init__(
        self, domain: str, index: BlockIndex, contract: HashContract, identity: str
    ) -> None:
        self.domain, self.index, self.contract, self.identity = domain, index, contract, identity
        self._ours: dict[EngineHash, bytes] = {}
        self._media: dict[EngineHash, set[str | None]] = {}
        self._seeds = HashMemo(contract, identity)
        self.orphans = 0

    def __len__(self) -> int:
        return len(self._ours)

    def clear(self) -> None:
        """The pod holds nothing we know of (a restart, a resync, ``AllBlocksCleared``)."""
        self.index.drop_node(self.domain)
        self._ours.clear()
        self._media.clear()

    def apply(self, events: Sequence[Event]) -> None:
        for ev in events:
            if isinstance(ev, Stored):
                self._stored(ev)
            elif isinstance(ev, Removed):
                self._removed(ev)
            else:
                self.clear()

    def _stored(self, ev: Stored) -> None:
        if ev.group or ev.medium not in TIERS:
            return  # another KV group (hybrid models) or a medium that is no node tier
        bs = self.contract.block_size
        if ev.block_size != bs:
            raise EventFormatError(
                "block_size",
                f"the pod stores blocks of {ev.block_size} tokens but the pool's contract "
                f"names blocks of {bs}; its vLLM must run with --block-size {bs}",
            )
        if len(ev.tokens) != bs * len(ev.hashes):
            raise EventFormatError(
                "garbage",
                f"BlockStored has {len(ev.hashes)} hashes but {len(ev.tokens)} token ids",
            )
        if ev.parent is None:
            ours = self.contract.block_hashes(ev.tokens, "", parent=self._seeds.seed(ev.salt))
        else:
            parent = self._ours.get(ev.parent)
            if parent is None:
                self.orphans += len(ev.hashes)
                return
            ours = self.contract.block_hashes(ev.tokens, "", parent=parent)
        for h, mine in zip(ev.hashes, ours, strict=True):
            self._ours[h] = mine
            self._media.setdefault(h, set()).add(ev.medium)
        self._index(ev.hashes, ours)

    def _index(self, hashes: Sequence[EngineHash], ours: Sequence[bytes]) -> None:
        device = [o for h, o in zip(hashes, ours, strict=True) if _tier(self._media[h]) == DEVICE]
        if device:
            self.index.store(self.domain, device, DEVICE)
        if len(device) < len(ours):
            host = [o for h, o in zip(hashes, ours, strict=True) if _tier(self._media[h]) == HOST]
            self.index.store(self.domain, host, HOST)

    def _removed(self, ev: Removed) -> None:
        if ev.group or ev.medium not in TIERS:
            return
        gone, moved = [], []
        for h in ev.hashes:
            media = self._media.get(h)
            if media is None:
                continue
            media.discard(ev.medium)
            if media:
                moved.append(h)
            else:
                del self._media[h]
                gone.append(self._ours.pop(h))
        if gone:
            self.index.evict(self.domain, gone)
        if moved:
            self._index(moved, [self._ours[h] for h in moved])


def _tier(media: set[str | None]) -> str:
    return DEVICE if media & {None, "GPU"} else HOST
