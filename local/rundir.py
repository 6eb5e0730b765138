"""Where a local fleet keeps its files: configs, tokens, logs, and the state file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

DEFAULT = ".kvmarina"


def run_dir(explicit: str | None = None) -> Path:
    """``--run-dir``, else ``$KVMARINA_RUN_DIR``, else ``./.kvmarina`` (one fleet per folder)."""
    return Path(explicit or os.environ.get("KVMARINA_RUN_DIR") or DEFAULT).resolve()


#: a unix socket's path must fit sockaddr_un (108 bytes with its NUL on Linux)
SOCKET_PATH_MAX = 100


def socket_path(folder: Path, name: str) -> Path:
    """``folder/name``, or, when that path is too long for a unix socket (a run
    directory deep in a tree), the same name in a short folder of the system's temp
    directory named after ``folder`` (so a fleet finds its own sockets again)."""
    path = folder / name
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.blake2b(str(folder).encode(), digest_size=6).hexdigest()
    short = Path(tempfile.gettempdir()) / f"kvm-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / name
