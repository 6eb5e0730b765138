"""Pool planning beyond the golden files: switches that remove parts of the plan."""

from __future__ import annotations

from pathlib import Path

import yaml

from kvmarina.operator.plan_pool import plan_pool
from kvmarina.operator.settings import Settings
from kvmarina.validate import parse_resource

REPO = Path(__file__).resolve().parents[2]


def test_a_pool_with_migration_off_plans_no_transfer_port() -> None:
    doc = yaml.safe_load((REPO / "examples/pool.yaml").read_text())
    doc["spec"].setdefault("migration", {})["enabled"] = False
    out = plan_pool(parse_resource(doc), "uid", Settings(), {"token": "T"})
    by_kind = {o["kind"]: o for o in out}
    config = yaml.safe_load(by_kind["ConfigMap"]["data"]["agent.yaml"])
    assert config["migration"]["enabled"] is False
    agent = by_kind["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in agent["ports"]] == ["metrics"]
    assert [p["name"] for p in by_kind["Service"]["spec"]["ports"]] == ["metrics"]
    policy = by_kind["NetworkPolicy"]["spec"]["ingress"]
    assert all(r["ports"] != [{"port": 7471}] for r in policy)
