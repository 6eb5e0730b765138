"""A prefix computed on node A reaches node B's engine by a pull, with identical output;
two engines of node A share what either computes, even while it is being computed."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest

from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import ProcessSpec, Supervisor, python_cmd


@pytest.fixture
def two_nodes(tmp_path: Path):  # type: ignore[no-untyped-def]
    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps({"servings": [{"name": "tiny", "namespace": "default", "token": "s3cret"}]})
    )
    (tmp_path / "token").write_text("s3cret")
    (tmp_path / "transfer").write_text("pool-transfer-token-0123456789")
    ha, hb, ea, eb, ep, ea2 = free_ports(6)
    sup = Supervisor(tmp_path / "run")
    urls = {}
    for node, http in (("a", ha), ("b", hb)):
        cfg = tmp_path / f"{node}.json"
        cfg.write_text(
            json.dumps(
                {
                    "node": node,
                    "socket_path": str(tmp_path / f"{node}.sock"),
                    "http_port": http,
                    "device_bytes": 64 * 2**20,
                    "credentials_file": str(creds),
                    "migration": {
                        "port": 0,
                        "host": "127.0.0.1",
                        "auth": "token",
                        "token_file": str(tmp_path / "transfer"),
                        "timeout_s": 4,
                    },
                }
            )
        )
        sup.start(
            ProcessSpec(
                f"agent-{node}",
                "agent",
                python_cmd("agent", "--config", str(cfg)),
                ready_url=f"http://127.0.0.1:{http}/readyz",
            )
        )
        urls[f"agent-{node}"] = f"http://127.0.0.1:{http}"
    sup.wait_ready(30)
    common = ("--preset", "tiny", "--model", "tiny")
    for name, node, port in (("engine-a", "a", ea), ("engine-b", "b", eb), ("engine-a2", "a", ea2)):
        sup.start(
            ProcessSpec(
                name,
                "engine",
                python_cmd(
                    "engine",
                    *common,
                    "--step-tokens",
                    "64",  # a long prefill takes many steps: time for a sibling to arrive
                    "--port",
                    str(port),
                    "--agent-socket",
                    str(tmp_path / f"{node}.sock"),
                    "--credential-file",
                    str(tmp_path / "token"),
                ),
                ready_url=f"http://127.0.0.1:{port}/health",
            )
        )
        urls[name] = f"http://127.0.0.1:{port}"
    sup.start(
        ProcessSpec(
            "engine-private",
            "engine",
            python_cmd("engine", *common, "--port", str(ep), "--no-agent"),
            ready_url=f"http://127.0.0.1:{ep}/health",
        )
    )
    urls["private"] = f"http://127.0.0.1:{ep}"
    sup.wait_ready(60)
    try:
        yield urls
    finally:
        sup.stop_all()


async def complete(
    url: str, prompt: str, headers: dict[str, str] | None = None
) -> dict[str, object]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/completions", json=body, headers=headers or {}) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def test_pull_from_a_peer_agent_then_identical_output(two_nodes: dict[str, str]) -> None:
    prompt = "A long shared preamble that node A computed first. " * 8 + "Then a question."
    first = await complete(two_nodes["engine-a"], prompt)
    blocks = (len(prompt) - 1) // 16
    hint = f"node=a;agent={two_nodes['agent-a']};blocks={blocks}"
    pulled = await complete(two_nodes["engine-b"], prompt, {"x-kvmarina-pull": hint})
    alone = await complete(two_nodes["private"], prompt)
    cached = pulled["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    assert cached == blocks * 16  # every block came over the wire and was reused
    text = alone["choices"][0]["text"]  # type: ignore[index]
    assert first["choices"][0]["text"] == pulled["choices"][0]["text"] == text  # type: ignore[index]
    async with aiohttp.ClientSession() as s, s.get(two_nodes["agent-b"] + "/stats") as r:
        stats = await r.json()
    assert stats["transfer"]["peers"][two_nodes["agent-a"]]["blocks"] == blocks


async def test_a_pull_of_blocks_the_peer_does_not_hold_is_logged_and_recomputed(
    two_nodes: dict[str, str], tmp_path: Path
) -> None:
    """A stale hint (the peer evicted the blocks, or has not committed them yet) costs
    a recomputation: the request is served all the same, and the engine's log says so."""
    prompt = "Nobody computed this preamble anywhere. " * 8 + "Question?"
    hint = f"node=a;agent={two_nodes['agent-a']};blocks=10"
    done = await complete(two_nodes["engine-b"], prompt, {"x-kvmarina-pull": hint})
    assert done["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
    log = (tmp_path / "run" / "logs" / "engine-b.log").read_text()
    assert "pull from a: 0 of 10 blocks pulled, 10 missing there" in log


async def test_a_stalled_peer_delays_only_the_request_that_pulls(
    two_nodes: dict[str, str],
) -> None:
    """The pull runs beside the scheduler, not in it: while one request waits on a
    peer that accepts and never answers, the engine serves others; then it computes
    the prefix itself."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        prompt = "A preamble nobody can send. " * 8 + "Question?"
        hint = f"node=z;agent=http://127.0.0.1:{port};blocks=10"
        stalled = asyncio.create_task(
            complete(two_nodes["engine-b"], prompt, {"x-kvmarina-pull": hint})
        )
        await asyncio.sleep(0.5)
        other = await complete(two_nodes["engine-b"], "Another request, served meanwhile.")
        assert other["choices"][0]["text"] and not stalled.done()  # type: ignore[index]
        done = await asyncio.wait_for(stalled, 30)
    assert done["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]


async def test_a_sibling_engine_waits_for_a_prefix_being_computed_instead_of_computing_it(
    two_nodes: dict[str, str],
) -> None:
    """The next turn of a conversation reaches the other engine of the node while
    the first engine is still prefilling the previous turn: the agent's claims tell
    it those blocks are coming, and it uses them (every usable block of the first
    prompt is a hit, whether it waited or they had landed) instead of computing
    them a second time. The output is what an engine alone gives."""
    first = "A long shared document. " * 100  # 2400 tokens: 38 steps of 64
    second = first + "And a follow-up question?"
    one = asyncio.create_task(complete(two_nodes["engine-a"], first))
    await asyncio.sleep(0.05)
    two = await complete(two_nodes["engine-a2"], second)
    await one
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    assert cached == len(first) // 16 * 16
    alone = await complete(two_nodes["private"], second)
    assert two["choices"][0]["text"] == alone["choices"][0]["text"]  # type: ignore[index]
