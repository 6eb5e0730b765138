"""`kvmarina up / status / down` as a user runs them: real processes, nothing left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvmarina.local.supervisor import load_state
from kvmarina.presets import PRESET_CONFIGS

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmarina.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmarina.cli",
            "up",
            "-f",
            str(REPO / "examples" / "local.yaml"),
            *extra,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"router for tiny: (http://\S+)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"up did not come up: {proc.stderr.read() if proc.stderr else ''}")


def pids(tmp_path: Path) -> list[int]:
    return [p.pid for p in load_state(tmp_path / ".kvmarina")[1]]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().split()
    except OSError:
        return False
    return stat[2] != "Z"


def complete(url: str, prompt: str) -> dict[str, object]:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 3}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=30).read())  # type: ignore[no-any-return]


def test_up_serves_status_shows_down_stops_everything(tmp_path: Path) -> None:
    proc, url = start_up(tmp_path)
    try:
        started = pids(tmp_path)
        assert len(started) == 5  # 2 agents, 2 engines, 1 router
        prompt = "a shared system prompt for every tenant in the namespace. " * 6
        complete(url, prompt + "first")
        second = complete(url, prompt + "second")
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 320  # type: ignore[index]
        # each engine pushed its load through its node agent's event stream, under the
        # pod name the router knows it by (router replicas see each other's sends)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        pushes = re.findall(r'kvmarina_router_pod_load_pushes\{pod="([^"]+)"\} (\S+)', metrics)
        assert sorted(pod for pod, _ in pushes) == ["engine-tiny-0", "engine-tiny-1"]
        assert sum(float(n) for _, n in pushes) >= 2  # a request's admission and its end
        # the pool asks for migration: every agent runs its transfer service
        for p in load_state(tmp_path / ".kvmarina")[1]:
            if p.spec.role == "agent":
                with urllib.request.urlopen(p.spec.info["url"] + "/stats", timeout=10) as r:
                    assert json.loads(r.read())["transfer"]["port"] > 0
        status = cli("status", cwd=tmp_path)
        assert status.returncode == 0 and "agent-local-node-0" in status.stdout
        agent = next(ln for ln in status.stdout.splitlines() if "agent-local-node-0" in ln)
        assert " dev " in agent and "bad /stats" not in agent  # the agent's typed /stats
        assert "router-tiny" in status.stdout and "up" in status.stdout
        down = cli("down", cwd=tmp_path)
        assert down.returncode == 0, down.stderr
        proc.wait(30)
        assert not any(alive(p) for p in started)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_on_up_stops_everything(tmp_path: Path) -> None:
    proc, _ = start_up(tmp_path, "--nodes", "1")
    started = pids(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    assert not any(alive(p) for p in started)
    assert load_state(tmp_path / ".kvmarina")[1] == []


def test_invalid_yaml_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "examples" / "local.yaml").read_text().replace("backend: cpu", "backend: rocm")
    )
    res = cli("up", "-f", str(bad), cwd=tmp_path)
    assert res.returncode == 1
    assert "spec.memory.backend" in res.stderr and "nothing was started" in res.stderr
    assert not (tmp_path / ".kvmarina").exists()


def test_a_part_that_fails_is_named_and_the_rest_stopped(tmp_path: Path) -> None:
    bad = tmp_path / "huge.yaml"
    bad.write_text(
        (REPO / "examples" / "local.yaml").read_text().replace("preset: tiny", "pvc: weights")
    )
    # no folder at all: said before anything starts
    res = cli(
        "up", "-f", str(bad), "--model-dir", str(tmp_path / "missing"), cwd=tmp_path, timeout=120
    )
    assert res.returncode == 1
    assert "no Hugging Face folder" in res.stderr and "--model-dir" in res.stderr
    # a folder whose weights are missing: the engines fail, are named, the rest stop
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(PRESET_CONFIGS["tiny"]))
    res = cli("up", "-f", str(bad), "--model-dir", str(broken), cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    assert "engine-tiny-" in res.stderr and "safetensors" in res.stderr
    assert "stopped" in res.stderr
    assert not any(alive(p) for p in pids(tmp_path))
    if os.path.exists(tmp_path / ".kvmarina" / "fleet.json"):
        assert load_state(tmp_path / ".kvmarina")[1] == []


@pytest.mark.slow
def test_demo_runs_and_writes_a_chart(tmp_path: Path) -> None:
    res = cli(
        "demo",
        "--preset",
        "tiny",
        "--users",
        "3",
        "--turns",
        "2",
        "--chart",
        str(tmp_path / "chart.png"),
        cwd=tmp_path,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cache-aware" in res.stdout and "round-robin" in res.stdout
    # sglang-router is a test extra: the demo puts it in front of the same engines
    assert "cache-aware vs the SGLang router: TTFT p50" in res.stdout, res.stdout
    assert re.search(r"^sglang .* 0$", res.stdout, re.M), res.stdout
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_a_planned_port_taken_before_its_process_binds_it_means_a_fresh_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ports are free when planned, but another program may bind one before the
    process it was planned for starts: that start-up fails, everything it started
    stops, and the fleet starts again on other ports."""
    import socket

    from kvmarina.local import fleet, up

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real, calls = fleet.free_ports, []

    def first_one_taken(n: int, host: str = "127.0.0.1") -> list[int]:
        calls.append(n)
        ports = real(n, host)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(fleet, "free_ports", first_one_taken)
    sup = up.start([str(REPO / "examples" / "local.yaml")], 1, str(tmp_path / "run"), None, 120)
    try:
        assert len(calls) > 2  # planned twice: agents, then engines and routers, again
        router = next(p for p in sup.procs if p.spec.role == "router")
        assert complete(router.spec.info["url"], "Hello")["choices"]
        assert all(p.alive() for p in sup.procs)
        assert f"{taken}" in capsys.readouterr().err
    finally:
        sup.stop_all()
        squatter.close()


def test_sockets_of_a_deep_run_directory_move_to_a_short_path(tmp_path: Path) -> None:
    from kvmarina.local.rundir import SOCKET_PATH_MAX, socket_path

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    sock = socket_path(deep, "node-0.sock")
    assert len(str(sock)) <= SOCKET_PATH_MAX and sock.name == "node-0.sock"
    assert socket_path(deep, "node-0.sock") == sock  # the same folder every time
    assert socket_path(tmp_path, "a.sock") == tmp_path / "a.sock"
