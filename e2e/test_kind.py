"""The kind end-to-end run, driven from pytest (`pytest -m e2e e2e/`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
@pytest.mark.timeout(3600)
def test_kind_end_to_end() -> None:
    res = subprocess.run(["bash", str(REPO / "e2e" / "run.sh")], cwd=REPO, timeout=3500)
    assert res.returncode == 0, "e2e/run.sh failed; its output is above"
