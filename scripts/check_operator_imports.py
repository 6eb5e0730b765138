"""Layer rules for ``operator/``, which import-linter cannot see (a namespace portion).

The operator may import the core (``kvmarina.*`` modules of ``core/``) and its own
modules, never another part, torch, triton or the kernels. Exit 1 listing every
violation. Usage: python scripts/check_operator_imports.py [FOLDER]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FORBIDDEN = ("torch", "triton", "kvmarina.kernels", "kvmarina.agent", "kvmarina.engine",
             "kvmarina.router", "kvmarina.local")  # fmt: skip


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


# Only one module talks to the Kubernetes API (kopf's own machinery aside).
API_CLIENTS = ("aiohttp", "kubernetes", "pykube")
API_MODULE = "kube.py"
# ...and one other holds an HTTP client, for the pods the operator created (agents'
# /stats, engines' /metrics): aiohttp only, never a Kubernetes client.
POD_HTTP_MODULE, POD_HTTP_CLIENTS = "scrape.py", ("aiohttp",)


def violations(folder: Path) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for line, name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{path}:{line}: the operator must not import {name}")
            allowed = POD_HTTP_CLIENTS if path.name == POD_HTTP_MODULE else ()
            top = name.split(".")[0]
            if path.name != API_MODULE and top in API_CLIENTS and top not in allowed:
                bad.append(f"{path}:{line}: only {API_MODULE} may talk to the API ({name})")
    return bad


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "operator"
    bad = violations(folder)
    for line in bad:
        print(line, file=sys.stderr)
    if not bad:
        print(f"operator imports ok ({folder})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
