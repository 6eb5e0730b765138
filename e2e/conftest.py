"""e2e needs docker (with an engine) and kind; without them every test skips with one line."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def missing_tools() -> list[str]:
    missing = [t for t in ("docker", "kind") if shutil.which(t) is None]
    if "docker" not in missing:
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
        if not ok:
            missing.append("a running docker engine")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e_items = [i for i in items if i.get_closest_marker("e2e")]
    if not e2e_items:
        return
    missing = missing_tools()
    if missing:
        skip = pytest.mark.skip(reason=f"e2e needs {', '.join(missing)}: not available here")
        for item in e2e_items:
            item.add_marker(skip)
