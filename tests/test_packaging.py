"""Guards for the folder -> package mapping (docs/design.md "The parts")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
#: modules hosted by another program (imported in its environment: tests/vllm)
HOSTED = {"kvmarina.connector.vllm"}


def _source_modules() -> dict[str, Path]:
    """Every importable module of the source tree, by dotted name."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIR.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p == "__pycache__" for p in parts):
                continue
            name = ".".join([pkg, *parts])
            # a sub-folder of a mapped folder that is itself mapped belongs to that mapping
            if any(
                name.startswith(k + ".") and k != pkg and k.startswith(pkg) for k in PACKAGE_DIR
            ):
                continue
            out[name] = path
    return out


def _package_folders() -> set[str]:
    """Dotted names of every folder under a mapped root that holds Python modules."""
    found = set()
    for pkg, folder in PACKAGE_DIR.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.parent.relative_to(root)
            found.add(".".join([pkg, *rel.parts]))
    return found


def test_operator_folder_has_no_init() -> None:
    # An operator/__init__.py would shadow the standard library's `operator`
    # for any Python started from the repo root.
    assert not (REPO / "operator" / "__init__.py").exists()


def test_packages_list_matches_folders() -> None:
    folders = _package_folders()
    declared = set(PACKAGES)
    assert folders - declared == set(), "folders holding modules but missing from `packages`"
    # a declared package may be an empty folder only while its part is not written yet
    for pkg in declared - folders:
        assert pkg in PACKAGE_DIR, f"{pkg} is declared but holds no module"


def test_every_part_folder_but_operator_is_a_regular_package() -> None:
    for pkg, folder in PACKAGE_DIR.items():
        if pkg != "kvmarina.operator":
            assert (REPO / folder / "__init__.py").exists(), folder


def test_stdlib_operator_wins_from_the_repo_root() -> None:
    res = subprocess.run(
        [sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(REPO) not in res.stdout


@pytest.mark.slow
def test_wheel_installs_and_imports_every_module(tmp_path: Path) -> None:
    """Build the wheel from a copy of the tree, install it non-editable into a fresh
    venv, and import every module from there (dependencies from the test venv)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md", *sorted(set(PACKAGE_DIR.values()))]:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif p.exists():
            shutil.copy2(p, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wheel = next(dist.glob("kvmarina-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    subprocess.run(
        [str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )

    # modules that run inside another program's environment import it (the vLLM
    # connector runs in vLLM's); they are imported where that program is installed
    expected = sorted(m for m in _source_modules() if m not in HOSTED)
    script = (
        "import importlib, sys, kvmarina\n"
        "assert 'site-packages' in kvmarina.__file__, kvmarina.__file__\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    try: importlib.import_module(name)\n"
        "    except Exception as e: bad.append(f'{name}: {e!r}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    # Dependencies come from the test venv's site-packages; .pth files (the
    # editable install) are not processed for PYTHONPATH entries.
    deps = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": deps}
    env.pop("PYTHONHOME", None)
    res = subprocess.run(
        [str(vpy), "-c", script, *expected],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


#: what only the agent and engine import: the base install (operator, router) lacks it
COMPONENT_ONLY = ("torch", "safetensors", "xxhash", "crc32c")


def _requirement_names(reqs: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in reqs}


def test_the_base_install_has_no_torch_and_the_extras_add_it() -> None:
    project = PYPROJECT["project"]
    base = _requirement_names(project["dependencies"])
    assert not base & set(COMPONENT_ONLY)
    extras = project["optional-dependencies"]
    assert {"torch", "xxhash", "crc32c"} <= _requirement_names(extras["agent"])
    assert {"kvmarina", "safetensors"} <= _requirement_names(extras["engine"])
    assert "kvmarina[agent,engine]" in extras["all"]


def _without_component_deps(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` where the agent's and engine's dependencies cannot be imported, as
    in the slim image (``sys.modules[name] = None`` makes ``import name`` fail)."""
    block = f"import sys\nfor m in {COMPONENT_ONLY!r}: sys.modules[m] = None\n"
    return subprocess.run(
        [sys.executable, "-c", block + code], capture_output=True, text=True, timeout=120
    )


def test_the_operator_and_router_run_on_the_base_install() -> None:
    done = _without_component_deps(
        "import kvmarina.operator.main, kvmarina.operator.handlers, kvmarina.router.main\n"
        "from kvmarina.cli import main\n"
        "for part in ('operator', 'router'):\n"
        "    try: main([part, '--help'])\n"
        "    except SystemExit as e: assert e.code == 0, (part, e.code)\n"
    )
    assert done.returncode == 0, done.stderr


def test_a_component_without_its_extra_says_which_to_install() -> None:
    done = _without_component_deps("from kvmarina.cli import main\nsys.exit(main(['agent']))")
    assert done.returncode == 2, done.stderr
    assert "install the 'agent' extra: pip install 'kvmarina[agent]'" in done.stderr


def test_the_image_builds_from_every_part_folder() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = {
        line.split()[1]
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--" not in line
    }
    assert set(PACKAGE_DIR.values()) <= copied
