"""kvmarina's KV connector inside real vLLM processes: two vLLM engines of one node share
prefixes through the node agent's pages, a third on another node pulls them from there,
and an agent that restarts in the middle of a run loses no request.

Agents run with the config the operator plans for a pool (``components.agent_config``),
the engines with the flags and connector config it plans for a serving
(``vllm_args``, ``vllm_connector``). Greedy output with loaded KV is compared with a
cold computation of the same prompt (another ``cache_salt``: other block names).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import ProcessSpec, Supervisor, python_cmd
from kvmarina.local.vllm import VLLMProcess
from kvmarina.local.workload import block_text
from kvmarina.operator.components import agent_config, credentials_doc, vllm_connector

from .conftest import MODEL, resources

TOKEN = "serving-token-0123456789"


@dataclass
class Node:
    name: str
    agent_url: str
    socket: str
    config: str


@dataclass
class Fleet:
    sup: Supervisor
    nodes: dict[str, Node]
    engines: dict[str, VLLMProcess]

    def restart_agent(self, node: str) -> None:
        spec = next(p.spec for p in self.sup.procs if p.spec.name == f"agent-{node}")
        proc = next(p for p in self.sup.procs if p.spec.name == f"agent-{node}")
        assert proc.popen is not None
        proc.popen.kill()
        proc.popen.wait(30)
        self.sup.procs.remove(proc)
        self.sup.start(spec)
        self.sup.wait_ready(60, names=[spec.name])


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({"model": MODEL, **body}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def stats(node: Node) -> dict[str, Any]:
    with urllib.request.urlopen(node.agent_url + "/stats", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def claimed(node: Node, at_least: int, timeout: float = 20.0) -> None:
    """Until an engine of the node claims ``at_least`` blocks: it is computing them (how
    soon its prefill starts depends on how busy the machine is)."""
    deadline = time.monotonic() + timeout
    while int(stats(node)["claimed_blocks"]) < at_least:
        assert time.monotonic() < deadline, f"no engine claimed {at_least} blocks"
        time.sleep(0.005)


def stored(node: Node, at_least: int, timeout: float = 20.0) -> int:
    """The node's committed device blocks once there are ``at_least`` of them: the
    connector saves on a thread of its own, so a reply can come before its blocks are
    committed."""
    deadline = time.monotonic() + timeout
    while (n := int(stats(node)["blocks"]["device"])) < at_least:
        assert time.monotonic() < deadline, f"{n} blocks committed, waited for {at_least}"
        time.sleep(0.05)
    return n


@pytest.fixture(scope="module")
def fleet(
    vllm_py: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Agents on nodes a and b (token-authenticated transfers); vLLM engines a0 and a1
    on a, b0 on b, each with kvmarina's connector."""
    tmp = tmp_path_factory.mktemp("conn")
    pool, serving = resources()
    creds = tmp / "creds.json"
    creds.write_text(json.dumps(credentials_doc([(MODEL, "default", "namespace", TOKEN)])))
    (tmp / "token").write_text(TOKEN)
    (tmp / "transfer").write_text("transfer-token-0123456789")
    sup = Supervisor(tmp / "run")
    nodes = {}
    for name, port in zip(("a", "b"), free_ports(2), strict=True):
        sock = str(tmp / f"{name}.sock")
        cfg = agent_config(
            pool.spec, node=name, socket_path=sock, credentials_file=str(creds),
            http_host="127.0.0.1", http_port=port, migration_port=0,
            migration_host="127.0.0.1", token_file=str(tmp / "transfer"),
        )  # fmt: skip
        cfg["migration"]["auth"] = "token"
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(cfg))
        sup.start(ProcessSpec(f"agent-{name}", "agent", python_cmd("agent", "--config", str(path)),
                              ready_url=f"http://127.0.0.1:{port}/readyz"))  # fmt: skip
        nodes[name] = Node(name, f"http://127.0.0.1:{port}", sock, str(path))
    engines = {}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    try:
        sup.wait_ready(60)
        for i, (name, node) in enumerate((("a0", "a"), ("a1", "a"), ("b0", "b"))):
            conn = vllm_connector(
                MODEL, "default", serving.spec, pool.spec,
                agent_socket=nodes[node].socket, credential_file=str(tmp / "token"),
            )  # fmt: skip
            engines[name] = VLLMProcess(
                vllm_py, serving.spec, pool.spec, model_dir, tmp / f"{name}.log",
                str(cores[i % len(cores)]), conn,
            )  # fmt: skip
            engines[name].start()
        for e in engines.values():
            e.wait()
        yield Fleet(sup, nodes, engines)
    finally:
        for e in engines.values():
            e.kill()
        sup.stop_all()


def complete(url: str, prompt: str, salt: str, **extra: Any) -> tuple[str, list[float], int]:
    doc = post(url, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1,
                     "cache_salt": salt, **extra})  # fmt: skip
    choice = doc["choices"][0]
    cached = int(doc["usage"]["prompt_tokens_details"]["cached_tokens"])
    return choice["text"], choice["logprobs"]["token_logprobs"], cached


def assert_same(a: tuple[str, list[float], int], b: tuple[str, list[float], int]) -> None:
    assert a[0] == b[0]
    assert max(abs(x - y) for x, y in zip(a[1], b[1], strict=True)) < 1e-4


def kv_usage(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:kv_cache_usage_perc"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vLLM reports no vllm:kv_cache_usage_perc")


def all_blocks_free(url: str, timeout: float = 20.0) -> None:
    """vLLM keeps a finished request's blocks while the connector saves them: they must
    all come back once the saves are over."""
    deadline = time.monotonic() + timeout
    while (used := kv_usage(url)) > 0:
        assert time.monotonic() < deadline, f"vLLM still holds {used:.2%} of its KV blocks"
        time.sleep(0.1)


def test_a_prompt_computed_by_one_vllm_is_served_by_its_sibling(fleet: Fleet) -> None:
    a0, a1 = fleet.engines["a0"], fleet.engines["a1"]
    prompt = block_text(7, 2000)  # 62 full blocks of 32, one token left to compute
    before = int(stats(fleet.nodes["a"])["blocks"]["device"])
    first = complete(a0.url, prompt, "tenant")
    stored(fleet.nodes["a"], before + 62)
    warm = complete(a1.url, prompt, "tenant")
    assert warm[2] == 62 * 32  # every full block but the last token's came from the agent
    cold = complete(a1.url, prompt, "someone-else")  # other block names: computed
    assert cold[2] == 0
    assert_same(warm, cold)
    assert_same(first, cold)
    all_blocks_free(a0.url)
    all_blocks_free(a1.url)


def test_a_prefix_two_engines_get_at_once_is_computed_once(fleet: Fleet) -> None:
    a0, a1 = fleet.engines["a0"], fleet.engines["a1"]
    prompt = block_text(9, 2000)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, a0.url, prompt, "tenant")
        claimed(fleet.nodes["a"], 62)  # a0 is prefilling (about 0.25 s idle)
        second = pool.submit(complete, a1.url, prompt, "tenant")
        done = first.result(), second.result()
    # a1 waited for a0's blocks (the agent's claims) and loaded them
    assert done[1][2] == 62 * 32
    assert_same(done[1], done[0])


def test_another_node_pulls_the_prefix_when_the_router_says_so(fleet: Fleet) -> None:
    a0, b0 = fleet.engines["a0"], fleet.engines["b0"]
    prompt = block_text(8, 1500)
    full = (len(prompt) + 1 - 1) // 32  # BOS + bytes, less the token left to compute
    before = int(stats(fleet.nodes["a"])["blocks"]["device"])
    complete(a0.url, prompt, "tenant")
    stored(fleet.nodes["a"], before + full)
    hint = {"kvmarina_pull": {"agent": fleet.nodes["a"].agent_url, "node": "a", "blocks": full}}
    warm = complete(b0.url, prompt, "tenant", kv_transfer_params=hint)
    assert warm[2] == full * 32
    pulled = sum(p.get("blocks", 0) for p in stats(fleet.nodes["b"])["transfer"]["peers"].values())
    assert pulled >= full
    assert_same(warm, complete(b0.url, prompt, "cold"))


def test_a_stalled_peer_delays_only_the_request_that_pulls(fleet: Fleet) -> None:
    """The pull runs beside vLLM's scheduler: while one request waits on a peer that
    accepts and never answers, the same engine serves others; then, its time up, the
    request is computed (nothing cached) with the output of a cold run."""
    b0 = fleet.engines["b0"]
    prompt = block_text(300, 1200)
    with socket.socket() as silent, ThreadPoolExecutor(1) as pool:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hint = {"kvmarina_pull": {"agent": f"http://127.0.0.1:{silent.getsockname()[1]}",
                                  "node": "z", "blocks": 30}}  # fmt: skip
        stalled = pool.submit(complete, b0.url, prompt, "tenant", kv_transfer_params=hint)
        time.sleep(1.0)
        t0 = time.monotonic()
        other = complete(b0.url, block_text(301, 400), "tenant")
        served_in = time.monotonic() - t0
        assert other[1] and not stalled.done() and served_in < 5  # answered meanwhile
        got = stalled.result(timeout=60)
    assert got[2] == 0
    assert_same(got, complete(b0.url, prompt, "cold"))


def test_an_agent_restart_in_the_middle_of_a_run_loses_no_request(fleet: Fleet) -> None:
    a0, a1 = fleet.engines["a0"], fleet.engines["a1"]
    prompts = [block_text(100 + k, 600 + 40 * k) for k in range(12)]

    def run(k: int) -> tuple[str, list[float], int]:
        return complete((a0, a1)[k % 2].url, prompts[k % 6], "tenant")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, k) for k in range(12)]
        fleet.restart_agent("a")
        results = [f.result() for f in futures]  # every request answered
    cold = {k: complete(a0.url, prompts[k], "cold") for k in range(6)}
    for k, res in enumerate(results):
        assert_same(res, cold[k % 6])
    # the connector finds the new agent (it tries every 5 s): prefixes are shared again
    time.sleep(6)
    prompt = block_text(200, 1200)
    before = int(stats(fleet.nodes["a"])["blocks"]["device"])
    complete(a0.url, prompt, "tenant")
    stored(fleet.nodes["a"], before + len(prompt) // 32)
    assert complete(a1.url, prompt, "tenant")[2] == (len(prompt) // 32) * 32
