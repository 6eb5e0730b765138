"""Shared-prefix workloads: the Mooncake trace, scaled down, or generated chats.

The Mooncake trace (FAST'25) gives each request ``hash_ids``: ids of 512-token
prefix blocks, equal ids meaning a shareable prefix. Replaying it means turning
each id into the same text every time; here each id becomes
``tokens_per_id`` bytes (one token each under the byte tokenizer) drawn from a
generator seeded by the id, so equal ids give equal text and thus equal block
hashes. Lengths are scaled by the same factor for every policy compared.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Default location relative to the repository root (never copied into the repo).
DEFAULT_TRACE = Path("..") / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz      "


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """One request of a replay: when to send it (seconds from start) and what."""

    at: float
    prompt: str
    max_tokens: int
    session: str = ""


def block_text(block_id: int, length: int) -> str:
    rng = random.Random(block_id * 7919 + 17)
    return "".join(rng.choice(_ALPHABET) for _ in range(length))


def find_trace(explicit: str | None, repo_root: Path) -> Path:
    path = Path(explicit) if explicit else (repo_root / DEFAULT_TRACE)
    if not path.is_file():
        raise FileNotFoundError(
            f"trace {path} not found; pass --trace PATH to the Mooncake JSONL trace"
        )
    return path


def mooncake(
    path: Path,
    *,
    limit: int,
    tokens_per_id: int = 32,
    time_scale: float = 1.0,
    max_output: int = 8,
    max_prompt: int = 4096,
) -> list[WorkRequest]:
    """The first ``limit`` requests, each 512-token block scaled to ``tokens_per_id``."""
    out: list[WorkRequest] = []
    for n, rec in enumerate(iter_jsonl(path)):
        if n >= limit:
            break
        prompt, max_tokens = _trace_request(rec, n, tokens_per_id, max_output, max_prompt)
        at = float(rec["timestamp"]) / 1000.0 * time_scale  # type: ignore[arg-type]
        out.append(WorkRequest(at=at, prompt=prompt, max_tokens=max_tokens))
    return out


def _trace_request(
    rec: dict[str, object], n: int, tokens_per_id: int, max_output: int, max_prompt: int
) -> tuple[str, int]:
    """The prompt and output length of trace record ``n``: its listed blocks as
    shared text, the rest of its input unique to it."""
    ids = [int(i) for i in rec["hash_ids"]]  # type: ignore[attr-defined]
    prefix = "".join(block_text(i, tokens_per_id) for i in ids)
    extra = max(0, int(int(rec["input_length"]) * tokens_per_id / 512) - len(prefix))  # type: ignore[call-overload]
    prompt = (prefix + block_text(10_000_000 + n, extra))[:max_prompt]
    return prompt, max(1, min(max_output, int(rec["output_length"])))  # type: ignore[call-overload]


def mooncake_shared(
    path: Path,
    *,
    limit: int,
    per_group: int = 8,
    tokens_per_id: int = 16,
    gap_s: float = 0.2,
    max_output: int = 8,
    max_prompt: int = 3072,
) -> list[WorkRequest]:
    """The trace's most-shared prefixes, scaled to a CPU: requests grouped by their
    first block id, the largest groups first, at most ``per_group`` requests of each,
    until ``limit``; in trace order, one every ``gap_s`` seconds.

    The trace's first requests share almost nothing (its reuse builds up over
    thousands of requests, ~3% in the first 100): a CPU replay of its head would
    measure no placement at all. Members of one group are far apart in the trace,
    hence the uniform spacing."""
    recs = [r for r in iter_jsonl(path) if r.get("hash_ids")]
    sizes: dict[int, int] = {}
    for r in recs:
        first = int(r["hash_ids"][0])  # type: ignore[index]
        sizes[first] = sizes.get(first, 0) + 1
    taken: dict[int, int] = {}
    for first in sorted(sizes, key=lambda k: (-sizes[k], k)):
        if sizes[first] < 2 or sum(taken.values()) >= limit:
            break
        taken[first] = min(per_group, sizes[first], limit - sum(taken.values()))
    out: list[WorkRequest] = []
    for n, r in enumerate(recs):
        first = int(r["hash_ids"][0])  # type: ignore[index]
        if taken.get(first, 0) <= 0:
            continue
        taken[first] -= 1
        prompt, max_tokens = _trace_request(r, n, tokens_per_id, max_output, max_prompt)
        out.append(WorkRequest(at=len(out) * gap_s, prompt=prompt, max_tokens=max_tokens))
    return out


#: A user's document is this many times ``context_len`` (mean ~1.1), and their
#: conversation this many times ``turns`` long (mean ~0.8): chat traffic is uneven.
DOC_SCALE = (1 / 3, 2 / 3, 4 / 3, 2.0)
TURN_SCALE = tuple(k / 6 for k in (1, 2, 3, 4, 6, 8, 10))


def conversations(
    *,
    users: int,
    turns: int,
    system_prompts: int = 2,
    system_len: int = 600,
    turn_len: int = 80,
    context_len: int = 0,
    reply_len: int = 16,
    start_gap_s: float = 0.3,
    think_s: float = 0.4,
    varied: bool = True,
    max_tokens: int = 8,
    seed: int = 0,
) -> list[WorkRequest]:
    """Multi-turn chats: each user has one of a few long system prompts, then a
    document of their own (a file, a repository map), and each turn resends the
    whole conversation so far (the common agent/chat pattern).

    Users arrive one every ``start_gap_s`` and wait about ``think_s`` between
    turns. ``varied`` draws each user's document length and number of turns
    (``DOC_SCALE``, ``TURN_SCALE``) and jitters the think times by +-50%, as real
    users differ; without it every user is the same. Sorted by send time."""
    rng = random.Random(seed)
    systems = [block_text(1_000 + i, system_len) for i in range(system_prompts)]
    out: list[WorkRequest] = []
    for u in range(users):
        doc_len, n_turns, t = context_len, turns, u * start_gap_s
        if varied:
            doc_len = round(context_len * rng.choice(DOC_SCALE))
            n_turns = max(1, round(turns * rng.choice(TURN_SCALE)))
        history = systems[u % system_prompts] + block_text(300_000 + u, doc_len)
        for turn in range(n_turns):
            history += "\nuser: " + block_text(100_000 + u * 1000 + turn, turn_len)
            out.append(
                WorkRequest(at=t, prompt=history, max_tokens=max_tokens, session=f"user-{u}")
            )
            history += "\nassistant: " + block_text(200_000 + u * 1000 + turn, reply_len)
            t += think_s * (rng.uniform(0.5, 1.5) if varied else 1.0)
    out.sort(key=lambda w: w.at)
    return out


def iter_jsonl(path: Path) -> Iterator[dict[str, object]]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
