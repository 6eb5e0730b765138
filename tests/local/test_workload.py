"""Workloads are deterministic and share prefixes where the trace says so; replay measures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvmarina.local.replay import replay
from kvmarina.local.workload import (
    DEFAULT_TRACE,
    WorkRequest,
    conversations,
    find_trace,
    mooncake,
    mooncake_shared,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))
from conftest import engine_process  # noqa: E402


def test_mooncake_replay_is_deterministic_and_shares_prefixes() -> None:
    path = REPO / DEFAULT_TRACE
    if not path.is_file():
        pytest.skip(f"trace not present at {path}")
    a = mooncake(path, limit=50, tokens_per_id=8)
    assert a == mooncake(path, limit=50, tokens_per_id=8)
    # requests listing the same leading hash ids start with the same text
    import json

    recs = [json.loads(line) for line in path.open().readlines()[:50]]
    for i, ri in enumerate(recs):
        for j in range(i):
            rj = recs[j]
            if ri["hash_ids"][:1] == rj["hash_ids"][:1]:
                assert a[i].prompt[:8] == a[j].prompt[:8]
    assert all(r.max_tokens >= 1 for r in a)


def test_mooncake_shared_takes_the_largest_prefix_groups(tmp_path: Path) -> None:
    import json

    recs = [
        {"timestamp": t * 100, "input_length": 2048, "output_length": 3, "hash_ids": ids}
        for t, ids in enumerate(
            [[1, 2, 3], [9], [1, 2, 4], [5, 6], [1, 2, 3, 7], [5, 8], [1, 2], [10, 11]]
        )
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    work = mooncake_shared(trace, limit=5, per_group=3, tokens_per_id=4, gap_s=0.5)
    # group 1 (4 requests, capped at 3) then group 5 (2 requests, capped by the limit)
    firsts = [w.prompt[:4] for w in work]
    assert len(work) == 5 and len(set(firsts)) == 2
    assert firsts.count(work[0].prompt[:4]) == 3
    assert [w.at for w in work] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # equal leading ids give equal leading text, so equal block hashes
    assert work[0].prompt[:12] == work[3].prompt[:12]
    assert work[0].prompt[:8] == work[1].prompt[:8] != work[2].prompt[:8]
    assert all(len(w.prompt) == 16 and w.max_tokens == 3 for w in work)


def test_missing_trace_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--trace"):
        find_trace(str(tmp_path / "nope.jsonl"), tmp_path)


def test_conversations_resend_growing_history() -> None:
    work = conversations(users=3, turns=2, system_len=100, turn_len=10, varied=False)
    assert len(work) == 6
    by_user: dict[str, list[str]] = {}
    for w in work:
        by_user.setdefault(w.session, []).append(w.prompt)
    for prompts in by_user.values():
        assert prompts[1].startswith(prompts[0])


def test_varied_conversations_differ_per_user_and_arrive_staggered() -> None:
    work = conversations(
        users=12, turns=6, system_len=50, context_len=300, turn_len=10, start_gap_s=0.3
    )
    assert [w.at for w in work] == sorted(w.at for w in work)
    turns: dict[str, int] = {}
    first: dict[str, WorkRequest] = {}
    for w in work:
        turns[w.session] = turns.get(w.session, 0) + 1
        first.setdefault(w.session, w)
    assert len(turns) == 12 and len(set(turns.values())) > 2  # uneven conversations
    assert len({len(w.prompt) for w in first.values()}) > 1  # documents of different sizes
    assert first["user-11"].at == pytest.approx(11 * 0.3)
    # the same seed gives the same workload: every policy replays the same requests
    again = conversations(
        users=12, turns=6, system_len=50, context_len=300, turn_len=10, start_gap_s=0.3
    )
    assert again == work


async def test_replay_measures_ttft_and_usage() -> None:
    work = conversations(
        users=2, turns=2, system_len=60, turn_len=10, start_gap_s=0, think_s=0, max_tokens=3
    )
    with engine_process("--no-agent", "--preset", "tiny", "--model", "tiny") as url:
        summary = await replay(url, "tiny", work, policy="direct", concurrency=2)
    assert summary.requests == 4 and summary.errors == 0
    assert summary.ttft_p50_ms > 0 and summary.prompt_tokens > 0
