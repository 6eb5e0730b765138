"""Every metric the dashboard and alert rules query is one a component exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def exported() -> set[str]:
    names = set()
    for folder in ("agent", "engine", "router"):
        for path in (REPO / folder).glob("*.py"):
            names |= set(re.findall(r'"(kvmarina_[a-z_]+)"', path.read_text()))
    return names


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_and_rules_use_real_metrics() -> None:
    known = exported()
    dash = json.loads((REPO / "charts/kvmarina/dashboards/kvmarina.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append((REPO / "charts/kvmarina/templates/prometheusrule.yaml").read_text())
    used = {base(m) for e in exprs for m in re.findall(r"kvmarina_[a-z_]+", e)}
    assert used and used <= known, sorted(used - known)
