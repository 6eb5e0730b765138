"""The local fleet's plan: the transfer credentials the operator's Secret would hold."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kvmarina.local.fleet import ENGINE_NICE, load_resources, plan_fleet, share_cores
from kvmarina.local.supervisor import ProcessSpec

REPO = Path(__file__).resolve().parents[2]


def _agent_configs(tmp_path: Path, yaml_text: str) -> list[dict[str, object]]:
    src = tmp_path / "fleet.yaml"
    src.write_text(yaml_text)
    pools, servings = load_resources([str(src)])
    plan = plan_fleet(pools, servings, tmp_path / "run", 2)
    out = []
    for spec in plan.agents:
        cfg_path = Path(spec.argv[spec.argv.index("--config") + 1])
        out.append(json.loads(cfg_path.read_text()))
    return out


def _pool(migration: str) -> str:
    return (
        (REPO / "examples" / "local.yaml")
        .read_text()
        .replace("  migration:\n    auth: token\n", migration)
    )


def test_agents_of_a_pool_share_one_private_transfer_token(tmp_path: Path) -> None:
    cfgs = _agent_configs(tmp_path, _pool("  migration:\n    auth: token\n"))
    files = {c["migration"]["token_file"] for c in cfgs}  # type: ignore[index]
    assert len(cfgs) == 2 and len(files) == 1
    token = Path(str(files.pop()))
    assert len(token.read_text()) >= 32 and token.stat().st_mode & 0o077 == 0
    assert all(c["migration"]["cert_dir"] is None for c in cfgs)  # type: ignore[index]


def test_migration_off_gives_no_credentials(tmp_path: Path) -> None:
    cfgs = _agent_configs(tmp_path, _pool("  migration:\n    enabled: false\n"))
    assert all(c["migration"]["token_file"] is None for c in cfgs)  # type: ignore[index]
    assert all(c["migration"]["port"] == 0 for c in cfgs)  # type: ignore[index]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="mTLS material needs the openssl CLI")
def test_mtls_pool_gets_a_ca_and_certificate(tmp_path: Path) -> None:
    cfgs = _agent_configs(tmp_path, _pool("  migration:\n    auth: mtls\n"))
    dirs = {c["migration"]["cert_dir"] for c in cfgs}  # type: ignore[index]
    assert len(dirs) == 1
    d = Path(str(dirs.pop()))
    for name in ("ca.crt", "tls.crt", "tls.key"):
        assert (d / name).read_text().startswith("-----BEGIN")
    assert (d / "tls.key").stat().st_mode & 0o077 == 0


def test_engines_sharing_the_machine_split_its_cores_unless_the_user_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "fleet.yaml"
    src.write_text((REPO / "examples" / "local.yaml").read_text())
    pools, servings = load_resources([str(src)])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = plan_fleet(pools, servings, tmp_path / "a", 2)
    engines = plan.engines
    assert engines and all(e.env["OMP_WAIT_POLICY"] == "PASSIVE" for e in engines)
    cores = len(os.sched_getaffinity(0))
    assert all(e.env["OMP_NUM_THREADS"] == str(max(1, cores // len(engines))) for e in engines)
    # engines yield the cores to the router and the agents, which run at the usual priority
    assert all(e.nice == ENGINE_NICE > 0 for e in engines)
    assert all(p.nice == 0 for p in plan.agents + plan.routers)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = plan_fleet(pools, servings, tmp_path / "b", 2)
    for e in plan.engines:  # theirs is inherited
        assert "OMP_WAIT_POLICY" not in e.env and "OMP_NUM_THREADS" not in e.env


def test_cores_are_split_evenly_and_every_engine_gets_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, n, want in ((2, 4, "1"), (8, 4, "2"), (9, 4, "2"), (16, 1, "16"), (1, 3, "1")):
        engines = [ProcessSpec(f"e{i}", "engine", ("true",)) for i in range(n)]
        share_cores(engines, cores)
        assert [e.env["OMP_NUM_THREADS"] for e in engines] == [want] * n
