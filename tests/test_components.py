"""The planned component configs are accepted by the components' own loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kvmarina.agent.config import load_config as load_agent_config
from kvmarina.agent.node.credentials import CredentialStore
from kvmarina.engine.serve import build_parser
from kvmarina.operator.components import (
    Endpoint,
    PlanError,
    agent_config,
    credentials_doc,
    engine_env,
    router_config,
    vllm_args,
    vllm_env,
)
from kvmarina.presets import write_preset_folder
from kvmarina.router.config import ConfigError, parse_config
from kvmarina.serving import flag_values
from kvmarina.validate import load_file

REPO = Path(__file__).resolve().parent.parent


def _pool_and_serving(example: str = "local.yaml"):  # type: ignore[no-untyped-def]
    resources, problems = load_file(str(REPO / "examples" / example))
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


def test_vllm_flags_follow_the_pool_and_the_serving() -> None:
    pool, serving = _pool_and_serving("vllm-local.yaml")
    args = vllm_args(serving.spec, pool.spec, model_dir="/m", events_port=6001, replay_port=6002)
    flags = flag_values(args)
    assert flags["--model"] == "/m" and flags["--served-model-name"] == "small-vllm"
    assert flags["--block-size"] == "32" == str(pool.spec.hashing.block_size)
    assert flags["--kv-cache-memory-bytes"] == str(256 * 2**20)  # budget.max
    assert flags["--max-num-seqs"] == "8" and flags["--max-num-queued-reqs"] == str(8 + 256)
    assert flags["--prefix-caching-hash-algo"] == "sha256" and flags["--dtype"] == "float32"
    assert "--enable-prefix-caching" in args and "--enable-prompt-tokens-details" in args
    events = json.loads(flags["--kv-events-config"])
    assert events == {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6001",
        "replay_endpoint": "tcp://*:6002", "topic": "kv",
    }  # fmt: skip
    # the serving's own arguments come last; the pod ports are the default
    extra = serving.spec.model_copy(
        update={"engine": serving.spec.engine.model_copy(update={"args": ["--seed", "3"]})}
    )
    pod_args = vllm_args(extra, pool.spec, model_dir="/m")
    assert pod_args[-2:] == ["--seed", "3"] and "tcp://*:5557" in "".join(pod_args)
    assert vllm_env("debug")["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_a_vllm_router_config_derives_its_identity_from_the_folder(tmp_path: Path) -> None:
    pool, serving = _pool_and_serving("vllm-local.yaml")
    write_preset_folder("small", "float32", tmp_path)
    pods = [Endpoint("v0", "http://127.0.0.1:1", "n", None, "tcp://127.0.0.1:2", None)]
    doc = router_config("s", "default", serving.spec, pool.spec, pods, model_dir=str(tmp_path))
    assert doc["engine"] == "vllm" and doc["pods"][0]["kv_events"] == "tcp://127.0.0.1:2"
    # a model folder that is no preset: the router names it from its config.json, as
    # the engines do
    pvc = serving.spec.model.model_copy(update={"preset": None, "pvc": "weights"})
    folder_spec = serving.spec.model_copy(update={"model": pvc})
    doc = router_config("s", "default", folder_spec, pool.spec, pods, model_dir=str(tmp_path))
    assert doc["model_identity"] == "auto"
    cfg = parse_config(doc)
    assert cfg.model_identity == "small-vllm@main|L4/H2/D32/float32/B32|tp0of1|vllm-cpu"
    with pytest.raises(PlanError, match="model folder"):
        router_config("s", "default", folder_spec, pool.spec, pods)
    bad = {**doc, "pods": [{**doc["pods"][0], "kv_events": "http://x"}]}
    with pytest.raises(ConfigError, match="tcp://"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="auto needs tokenizer_dir"):
        parse_config({**doc, "tokenizer_dir": None})
