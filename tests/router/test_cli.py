"""``kvmarina router`` and ``kvmarina engine --simulate`` as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import router_doc


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_router_process_in_front_of_simulated_engines(tmp_path: Path, loop: str) -> None:
    """``KVMARINA_ROUTER_LOOP`` picks the router's event loop (uvloop by default)."""
    cmd = [sys.executable, "-m", "kvmarina.cli"]
    eng = subprocess.Popen(
        [
            *cmd,
            "engine",
            "--simulate",
            "--port",
            "0",
            "--replicas",
            "2",
            "--node",
            "n",
            "--prefill-tps",
            "0",
            "--decode-tps",
            "0",
            "--model-identity",
            "sim@v1|simulated|tp0of1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    router = None
    try:
        assert eng.stdout is not None
        info = json.loads(eng.stdout.readline())
        pods = [
            {"name": f"p{i}", "url": u, "node": n, "agent_url": u}
            for i, (u, n) in enumerate(zip(info["simulated_engines"], info["nodes"], strict=True))
        ]
        cfg = tmp_path / "router.yaml"
        cfg.write_text(json.dumps(router_doc(pods)))  # JSON is valid YAML
        router = subprocess.Popen(
            [*cmd, "router", "--config", str(cfg), "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "KVMARINA_ROUTER_LOOP": loop},
        )
        assert router.stdout is not None
        line = router.stdout.readline()
        assert line.startswith(f"kvmarina router on {loop} listening on "), line
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:")
        body = json.dumps({"model": "sim", "prompt": "hello " * 10, "max_tokens": 2}).encode()
        req = urllib.request.Request(
            f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["usage"]["prompt_tokens"] == 60
    finally:
        for p in (router, eng):
            if p is not None:
                p.kill()
                p.wait()


def test_router_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: m\n")
    res = subprocess.run(
        [sys.executable, "-m", "kvmarina.cli", "router", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "model_identity" in res.stderr


def test_router_unknown_event_loop_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    pod = {"name": "p0", "url": "http://127.0.0.1:9", "node": "n"}
    cfg.write_text(json.dumps(router_doc([pod])))
    r = subprocess.run(
        [sys.executable, "-m", "kvmarina.cli", "router", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "KVMARINA_ROUTER_LOOP": "trio"},
        timeout=60,
    )
    assert r.returncode == 2
    assert "KVMARINA_ROUTER_LOOP='trio' is not an event loop it knows; use uvloop or asyncio" in (
        r.stderr
    )
