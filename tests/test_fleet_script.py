"""``benchmarks/fleet.py`` as a person runs it, on a small workload: a real local fleet
(two nodes, the preset ``tiny``), kvmarina's policies and the SGLang router in front of
the same engines, rounds in rotated order and their medians."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "fleet.py"


@pytest.mark.slow
def test_every_policy_runs_each_round_and_is_reported_as_medians() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--users", "3", "--turns", "2",
         "--rounds", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("{")))
    assert result["engine"] == "reference" and result["rounds"] == 2
    policies = {"cache_aware", "round_robin", "least_load", "sglang"}
    assert policies <= set(result), "sglang-router is a test extra: it must be compared"
    for p in policies:
        figures = result[p]
        assert figures["errors"] == 0
        assert len(figures["ttft_p50_ms_rounds"]) == len(figures["hit_rate_rounds"]) == 2
        assert min(figures["ttft_p50_ms_rounds"]) <= figures["ttft_p50_ms"]
        assert figures["ttft_p50_ms"] <= max(figures["ttft_p50_ms_rounds"])
    assert set(result["targets_met"]) == {
        "ttft_p50<=0.5*round_robin",
        "ttft_p50<=sglang",
        "hit_rate>=sglang",
    }
