"""Where a local fleet keeps its files: configs, tokens, logs, and the state file."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = ".kvmarina"


def run_dir(explicit: str | None = None) -> Path:
    """``--run-dir``, else ``$KVMARINA_RUN_DIR``, else ``./.kvmarina`` (one fleet per folder)."""
    return Path(explicit or os.environ.get("KVMARINA_RUN_DIR") or DEFAULT).resolve()
