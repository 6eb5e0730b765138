"""kvmarina inside another engine's Python: the files a vLLM pod's init container copies.

vLLM's images do not carry kvmarina. An init container of kvmarina's image runs
``kvmarina connector install --into DIR`` into a volume the vLLM container mounts and
puts on its ``PYTHONPATH``: the core (contracts, framing), the agent client and the
connector, as plain ``.py`` files, and msgpack (its compiled part when the Python
versions match, else msgpack's own pure-Python fallback takes over).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

#: packages the connector imports, and where each goes under the target folder
HOSTED_PACKAGES = {
    "kvmarina": "kvmarina",
    "kvmarina.agent": "kvmarina/agent",
    "kvmarina.agent.client": "kvmarina/agent/client",
    "kvmarina.connector": "kvmarina/connector",
}


def _folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed here")
    return Path(next(iter(spec.submodule_search_locations)))


def install_connector(into: str | Path) -> Path:
    target = Path(into)
    for package, sub in HOSTED_PACKAGES.items():
        dst = target / sub
        dst.mkdir(parents=True, exist_ok=True)
        for src in _folder(package).glob("*.py"):
            shutil.copy2(src, dst / src.name)
    msgpack = _folder("msgpack")
    shutil.copytree(
        msgpack,
        target / "msgpack",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return target
