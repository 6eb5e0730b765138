"""The planned component configs are accepted by the components' own loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kvmarina.agent.config import load_config as load_agent_config
from kvmarina.agent.credentials import CredentialStore
from kvmarina.engine.serve import build_parser
from kvmarina.operator.components import (
    Endpoint,
    PlanError,
    agent_config,
    credentials_doc,
    engine_env,
    router_config,
)
from kvmarina.router.config import parse_config
from kvmarina.validate import load_file

REPO = Path(__file__).resolve().parent.parent


def _pool_and_serving():  # type: ignore[no-untyped-def]
    resources, problems = load_file(str(REPO / "examples" / "local.yaml"))
    assert not problems
    pool = next(r for r in resources if r.kind == "KVCachePool")
    serving = next(r for r in resources if r.kind == "ModelServing")
    return pool, serving


def test_agent_config_and_credentials_load(tmp_path: Path) -> None:
    pool, _serving = _pool_and_serving()
    creds = tmp_path / "creds.yaml"
    creds.write_text(yaml.safe_dump(credentials_doc([("tiny", "default", "namespace", "t0k")])))
    cfg = agent_config(
        pool.spec, node="node-0", socket_path=str(tmp_path / "a.sock"), credentials_file=str(creds)
    )
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(cfg))
    loaded = load_agent_config(str(path))
    assert loaded.device_bytes == pool.spec.memory.device_bytes and loaded.backend == "cpu"
    assert loaded.contract().describe() == "blake2b-128/16"
    assert CredentialStore.load(creds).identify("t0k").scope_key == "ns/default"  # type: ignore[union-attr]


def test_engine_env_parses_with_the_engine_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, serving = _pool_and_serving()
    env = engine_env(
        "tiny", "default", serving.spec, pool.spec, agent_socket="/s", credential_file="/c"
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args([])
    assert args.preset == "tiny" and args.block_size == 16 and args.trust_salt_header
    assert args.agent_socket == "/s" and args.credential_file == "/c"
    assert args.default_salt == "n7:default"
    assert int(args.budget_max) == 256 * 2**20
    for k in env:
        os.environ.pop(k, None)


def test_router_config_validates() -> None:
    pool, serving = _pool_and_serving()
    pods = [Endpoint("tiny-0", "http://127.0.0.1:1", "node-0", "http://127.0.0.1:2")]
    cfg = parse_config(router_config("tiny", "default", serving.spec, pool.spec, pods))
    assert cfg.model_identity == "tiny@main|L2/H2/D16/float32/B16|tp0of1"
    assert cfg.sharing.scope == "namespace"
    with pytest.raises(PlanError, match="at least one engine"):
        router_config("tiny", "default", serving.spec, pool.spec, [])
