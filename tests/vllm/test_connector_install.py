"""``kvmarina connector install``, run as a vLLM pod's init container runs it: the
copied files alone give vLLM's Python the connector and the agent client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, kvmarina.agent.client as client, kvmarina.connector.vllm as connector
print(json.dumps({"client": client.__file__, "connector": connector.__file__,
                  "hits": client.Hits.__module__}))
"""


def test_the_copied_files_alone_import_the_connector(vllm_py: str, tmp_path: Path) -> None:
    into = tmp_path / "kvmarina-python"
    cli = Path(sys.executable).with_name("kvmarina")
    out = subprocess.run(
        [str(cli), "connector", "install", "--into", str(into)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert str(into) in out.stdout
    env = {**os.environ, "PYTHONPATH": str(into)}  # what the pod spec sets
    probe = subprocess.run(
        [vllm_py, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["client"].startswith(str(into)) and got["connector"].startswith(str(into))
    assert got["hits"] == "kvmarina.agent.client.hits"
    assert (into / "msgpack" / "__init__.py").exists()
