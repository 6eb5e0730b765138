"""The SGLang router as a local peer: started in front of engines, or said absent."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from kvmarina.local import sglang


def test_absent_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sglang, "executable", lambda: None)
    assert sglang.command(["http://127.0.0.1:1"]) is None
    assert sglang.start(["http://127.0.0.1:1"]) is None


def test_one_that_exits_at_once_is_an_error_that_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
    monkeypatch.setattr(sglang, "command", lambda urls: (argv, "http://127.0.0.1:9"))
    with pytest.raises(RuntimeError, match="exited with 3 before it was ready"):
        sglang.start(["http://127.0.0.1:1"], ready_s=10)


def test_the_real_router_answers_health_and_stops() -> None:
    if sglang.executable() is None:
        pytest.skip("sglang-router is not installed (a test extra: make test installs it)")
    router = sglang.start(["http://127.0.0.1:9"])
    assert router is not None
    try:
        with urllib.request.urlopen(router.url + "/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        router.stop()
    assert router.proc.poll() is not None
