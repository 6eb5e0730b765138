"""`kvmarina up -f examples/vllm-local.yaml` as a user runs it: two simulated nodes, a
real vLLM engine on each, the router following their KV events; `down` stops it all."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmarina.local.supervisor import ProcessSpec, load_state
from kvmarina.local.vllm import bind_cores

REPO = Path(__file__).resolve().parents[2]


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=60).read())  # type: ignore[no-any-return]


def test_up_runs_vllm_engines_behind_the_router(
    vllm_py: str, tmp_path: Path, process_group: Callable[[int], list[int]]
) -> None:
    env = {**os.environ, "KVMARINA_VLLM_PYTHON": vllm_py}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmarina.cli", "up", "-f", str(REPO / "examples/vllm-local.yaml")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    url = None
    deadline = time.monotonic() + 300
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(r"router for small-vllm: (http://\S+)", line):
            url = m.group(1)
        elif not line and proc.poll() is not None:
            break
    try:
        assert url, proc.stderr.read() if proc.stderr else ""
        messages = [
            {"role": "system", "content": "You answer questions about paddling. " * 8},
            {"role": "user", "content": "What is a J-stroke?"},
        ]
        body = {"model": "small-vllm", "messages": messages, "max_tokens": 4}
        first = post(url + "/v1/chat/completions", body)
        again = post(url + "/v1/chat/completions", body)
        usage = again["usage"]
        assert isinstance(usage, dict) and isinstance(first["usage"], dict)
        # the repeat went to the engine that computed the prompt: all but its last block
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 64
        # a follower connects within a second of its vLLM coming up; the URL is printed
        # once every engine answers HTTP, which may be just before that
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                health = json.loads(r.read())
            if health["mode"] == "events" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert health["mode"] == "events", json.dumps(health["pods"])
        assert all(p["kv_events"]["live"] for p in health["pods"].values())
        # each engine's whole process tree (API server, engine core) on its own cores
        engines = [p for p in load_state(tmp_path / ".kvmarina")[1] if p.spec.role == "engine"]
        assert len(engines) == 2 and all(p.spec.cpus for p in engines)
        for p in engines:
            tree = process_group(p.pid)
            assert len(tree) >= 2  # the API server and the engine core it started
            assert all(os.sched_getaffinity(pid) == set(p.spec.cpus) for pid in tree)
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "kvmarina.cli", "down"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        proc.wait(60)
    assert down.returncode == 0, down.stderr
    assert not any(p.alive() for p in load_state(tmp_path / ".kvmarina")[1])


def test_each_vllm_engine_gets_its_own_cores() -> None:
    """Its compute threads and its whole process tree (API server included)."""
    two = [ProcessSpec(f"e{i}", "engine", ("x",)) for i in range(2)]
    bind_cores(two, cores=[0, 1, 2, 3])
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in two] == ["0,1", "2,3"]
    assert [s.cpus for s in two] == [(0, 1), (2, 3)]
    three = [ProcessSpec(f"e{i}", "engine", ("x",)) for i in range(3)]
    bind_cores(three, cores=[0, 1])  # more engines than cores: they share, round-robin
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in three] == ["0", "1", "0"]
    assert [s.cpus for s in three] == [(0,), (1,), (0,)]


def test_a_binding_the_user_set_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    specs = [ProcessSpec("e0", "engine", ("x",))]
    bind_cores(specs, cores=[0, 1])
    assert specs[0].cpus == () and "VLLM_CPU_OMP_THREADS_BIND" not in specs[0].env


@pytest.mark.timeout(480)
def test_demo_replays_through_vllm_engines_round_robin_and_the_sglang_router(
    vllm_py: str, tmp_path: Path
) -> None:
    """``kvmarina demo --engine vllm`` as a user runs it, on a small workload: the same
    vLLM engines behind cache-aware routing, round-robin and the SGLang router (a test
    extra, so it is here), a row each, the comparisons, the chart; nothing left running."""
    env = {**os.environ, "KVMARINA_VLLM_PYTHON": vllm_py}
    res = subprocess.run(
        [sys.executable, "-m", "kvmarina.cli", "demo", "--engine", "vllm", "--users", "3",
         "--turns", "2", "--chart", str(tmp_path / "chart.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "2 nodes x 1 vLLM engine" in out
    rows = {
        m.group(1): m
        for m in re.finditer(r"^(cache-aware|round-robin|sglang) +\d+ms .*$", out, re.M)
    }
    assert set(rows) == {"cache-aware", "round-robin", "sglang"}, out
    for row in rows.values():
        assert row.group(0).split()[-1] == "0"  # no errors
    assert "cache-aware vs round-robin: TTFT p50" in out
    assert "cache-aware vs the SGLang router: TTFT p50" in out
    assert (tmp_path / "chart.png").stat().st_size > 1000
    assert not any(p.alive() for p in load_state(tmp_path / ".kvmarina-demo")[1])
