"""``benchmarks/router_replay.py`` as a person runs it: a small trace, real simulated
engines, our router and the SGLang router, rounds and their medians."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "router_replay.py"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def small_trace(path: Path) -> Path:
    """Three conversations of four turns, each turn one hash id longer."""
    rows = []
    for turn in range(4):
        for conv in range(3):
            ids = [1000 * conv + k for k in range(turn + 2)]
            rows.append(
                {
                    "timestamp": 100 * len(rows),
                    "input_length": 512 * len(ids),
                    "output_length": 4,
                    "hash_ids": ids,
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rounds_are_run_in_turn_and_reported_as_medians(tmp_path: Path) -> None:
    trace = small_trace(tmp_path / "trace.jsonl")
    done = run(
        "--trace", str(trace), "--requests", "0", "--replay-seconds", "0.5",
        "--engines", "2", "--regimes", "decode", "--policies", "cache-aware,sglang",
        "--replicas-regime", "", "--repeat", "2", "--router-cpu", "-1", "--engine-cpu", "-1",
    )  # fmt: skip
    # 1 is a missed target, which two engines and twelve requests may well give
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert done.stderr.count("(round 2)") == 2  # both policies, in the second round too
    result = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))
    ours = result["decode_cache_aware"]
    assert len(ours["hit_rate_rounds"]) == len(ours["ttft_p90_ms_rounds"]) == 2
    assert ours["errors"] == 0 and 0.0 < ours["hit_rate"] < 1.0
    assert sorted(ours["hit_rate_rounds"])[0] <= ours["hit_rate"]
    if "decode_sglang" not in result:
        pytest.skip("sglang-router is not installed: no side-by-side figures")
    assert "decode: hit_rate>=sglang" in result["targets_met"]


@pytest.mark.parametrize(
    ("front", "policies"),
    [("client", "replica1+shadow"), ("router", "replica1x2")],
)
def test_replicas_run_behind_either_front(tmp_path: Path, front: str, policies: str) -> None:
    """One replica and two (and a control) behind the replay's own round-robin or a
    round-robin kvmarina router: every request answered, both replica targets judged."""
    trace = small_trace(tmp_path / "trace.jsonl")
    # caches that hold the whole trace: at the default 0.7 each engine holds about one
    # conversation, and a placement that alternates them evicts every prefix before its
    # next turn (a hit rate of 0 came once, with the suite on two workers)
    done = run(
        "--trace", str(trace), "--replay-seconds", "0.5", "--engines", "2", "--capacity", "2",
        "--regimes", "decode", "--policies", policies, "--replicas-regime", "decode",
        "--front", front, "--router-cpu", "-1", "--engine-cpu", "-1",
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    result = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))
    for key in ("replica1", "replicas2", policies):
        ok = result[key]["errors"] == 0 and result[key]["hit_rate"] > 0.0
        assert ok, (key, result, done.stderr[-1500:])  # everything, should it ever fail
    assert set(result["targets_met"]) == {
        "replicas: hit_rate>=0.95*one",
        "replicas: ttft_p90<=1.05*one",
    }
    assert ("replicas2_p90_over_shadow" in result) == (policies == "replica1+shadow")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--repeat", "0"], "--repeat 0: give 1 or more rounds"),
        (["--requests", "-5"], "--requests -5: give a row count, or 0 for all"),
        (["--regimes", "prefill"], "unknown regime(s) ['prefill']"),
        (["--policies", "cache-aware,lru"], "unknown policy(ies) ['lru']"),
        (["--replicas-regime", "prefill"], "--replicas-regime prefill: use first_token"),
        (["--policies", "replica1x2"], "replica1x2 measures the router front's cost"),
        (["--front", "nginx"], "argument --front: invalid choice: 'nginx'"),
        (["--trace", "/nonexistent/trace.jsonl"], "trace not found: /nonexistent/trace.jsonl"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args: list[str], says: str) -> None:
    done = run(*args, timeout=60)
    assert done.returncode != 0 and says in done.stderr
