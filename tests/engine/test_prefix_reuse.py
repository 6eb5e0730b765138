"""Prefix reuse across engine processes on one agent: same tokens, less compute."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import ProcessSpec, Supervisor, python_cmd


@pytest.fixture
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps(
            {
                "servings": [
                    {
                        "name": "tiny",
                        "namespace": "default",
                        "scope": "namespace",
                        "token": "s3cret",
                    }
                ]
            }
        )
    )
    (tmp_path / "token").write_text("s3cret\n")
    agent_http, e1, e2, e3 = free_ports(4)
    cfg = tmp_path / "agent.json"
    cfg.write_text(
        json.dumps(
            {
                "node": "n0",
                "socket_path": str(tmp_path / "agent.sock"),
                "http_port": agent_http,
                "device_bytes": 64 * 2**20,
                "credentials_file": str(creds),
            }
        )
    )
    sup = Supervisor(tmp_path / "run")
    sup.start(
        ProcessSpec(
            "agent",
            "agent",
            python_cmd("agent", "--config", str(cfg)),
            ready_url=f"http://127.0.0.1:{agent_http}/readyz",
        )
    )
    sup.wait_ready(30)
    common = ("--preset", "tiny", "--model", "tiny", "--max-model-len", "2048")
    for name, port in (("engine-a", e1), ("engine-b", e2)):
        sup.start(
            ProcessSpec(
                name,
                "engine",
                python_cmd(
                    "engine",
                    *common,
                    "--port",
                    str(port),
                    "--agent-socket",
                    str(tmp_path / "agent.sock"),
                    "--credential-file",
                    str(tmp_path / "token"),
                ),
                ready_url=f"http://127.0.0.1:{port}/health",
            )
        )
    sup.start(
        ProcessSpec(
            "engine-private",
            "engine",
            python_cmd("engine", *common, "--port", str(e3), "--no-agent"),
            ready_url=f"http://127.0.0.1:{e3}/health",
        )
    )
    sup.wait_ready(60)
    try:
        yield {
            "a": f"http://127.0.0.1:{e1}",
            "b": f"http://127.0.0.1:{e2}",
            "private": f"http://127.0.0.1:{e3}",
            "agent": f"http://127.0.0.1:{agent_http}",
        }
    finally:
        sup.stop_all()


async def complete(url: str, prompt: str, n: int = 12) -> dict[str, object]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def test_reuse_across_processes_is_token_identical(fleet: dict[str, str]) -> None:
    system = "You are a careful assistant that answers briefly. " * 8  # ~400 tokens
    prompt = system + "Question: what is a KV cache?"
    first = await complete(fleet["a"], prompt)
    second = await complete(fleet["b"], prompt)  # another process, same agent
    private = await complete(fleet["private"], prompt)  # no sharing at all
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    assert cached >= 16 * ((len(prompt) - 1) // 16) - 16 and cached > 300
    text = first["choices"][0]["text"]  # type: ignore[index]
    assert second["choices"][0]["text"] == text == private["choices"][0]["text"]  # type: ignore[index]
    # a different question on the shared system prompt reuses the system prompt's blocks
    other = await complete(fleet["a"], system + "Question: and a block?")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] >= 384  # type: ignore[index]
    with_reuse = await complete(fleet["b"], system + "Question: and a block?")
    alone = await complete(fleet["private"], system + "Question: and a block?")
    assert with_reuse["choices"][0]["text"] == alone["choices"][0]["text"]  # type: ignore[index]


async def test_generated_tokens_are_committed_for_multi_turn(fleet: dict[str, str]) -> None:
    prompt = "Tell me a long story about caches. " * 4  # 140 tokens
    await complete(fleet["a"], prompt, n=40)
    async with aiohttp.ClientSession() as s, s.get(fleet["agent"] + "/stats") as r:
        stats = await r.json()
    # prompt + answer = 180 tokens = 11 full blocks, all committed (the answer's too),
    # so a follow-up turn that resends the conversation finds them
    assert stats["stats"]["committed"] == (140 + 40 - 1) // 16


async def test_agent_restart_engine_re_registers_without_stale_blocks(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps({"servings": [{"name": "tiny", "namespace": "default", "token": "s3cret"}]})
    )
    (tmp_path / "token").write_text("s3cret")
    http, eport = free_ports(2)
    cfg = tmp_path / "agent.json"
    cfg.write_text(
        json.dumps(
            {
                "node": "n0",
                "socket_path": str(tmp_path / "agent.sock"),
                "http_port": http,
                "device_bytes": 64 * 2**20,
                "credentials_file": str(creds),
            }
        )
    )
    agent = ProcessSpec(
        "agent",
        "agent",
        python_cmd("agent", "--config", str(cfg)),
        ready_url=f"http://127.0.0.1:{http}/readyz",
    )
    sup = Supervisor(tmp_path / "run")
    try:
        first_agent = sup.start(agent)
        sup.wait_ready(30)
        sup.start(
            ProcessSpec(
                "engine",
                "engine",
                python_cmd(
                    "engine",
                    "--preset",
                    "tiny",
                    "--model",
                    "tiny",
                    "--port",
                    str(eport),
                    "--agent-socket",
                    str(tmp_path / "agent.sock"),
                    "--credential-file",
                    str(tmp_path / "token"),
                ),
                ready_url=f"http://127.0.0.1:{eport}/health",
            )
        )
        sup.wait_ready(60)
        url = f"http://127.0.0.1:{eport}"
        prompt = "The agent will restart under this engine. " * 6
        before = await complete(url, prompt)
        warm = await complete(url, prompt)
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # type: ignore[index]
        first_agent.popen.terminate()  # type: ignore[union-attr]
        first_agent.popen.wait(10)  # type: ignore[union-attr]
        sup.procs.remove(first_agent)
        sup.start(agent)
        sup.wait_ready(30, names=["agent"])
        after = await complete(url, prompt)  # the engine re-registers with the new agent
        assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
        assert after["choices"][0]["text"] == before["choices"][0]["text"]  # type: ignore[index]
        again = await complete(url, prompt)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # type: ignore[index]
    finally:
        sup.stop_all()
