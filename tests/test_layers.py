"""The operator's layer rule (import-linter cannot see the namespace portion)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "check_operator_imports", REPO / "scripts" / "check_operator_imports.py"
)
assert _spec and _spec.loader
checker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checker)


def test_operator_imports_no_part_and_no_torch() -> None:
    assert checker.violations(REPO / "operator") == []


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import torch\nfrom kvmarina.agent import client\nfrom kvmarina import hashing\n"
    )
    found = checker.violations(tmp_path)
    assert len(found) == 2
    assert "torch" in found[0] and "kvmarina.agent" in found[1]
