"""The router in front of two real vLLM servers, following vLLM's own KV events.

One pair of vLLM processes serves the whole module (started together, ~1 minute). The
router is configured by the same planner the operator and local mode use
(``components.router_config``) and runs in-process, so the tests can read its index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kvmarina.operator.components import Endpoint, router_config
from kvmarina.prompts import prompt_tokens
from kvmarina.router.config import parse_config
from kvmarina.router.front import Front
from kvmarina.router.server import Router
from kvmarina.tenancy import scope_salt

from .conftest import BLOCK, MODEL, VLLMServer, resources

SALT = scope_salt("namespace", "default", MODEL)
SYSTEM = "You are the assistant of a shop that sells kayaks, paddles and dry bags. " * 3


async def wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def routed(
    vllms: list[VLLMServer], model_dir: str
) -> AsyncIterator[tuple[Router, str, aiohttp.ClientSession]]:
    pool, serving = resources()
    endpoints = [
        Endpoint(f"v{i}", s.url, f"node-{i}", None, s.events_url, s.replay_url)
        for i, s in enumerate(vllms)
    ]
    doc = router_config(MODEL, "default", serving.spec, pool.spec, endpoints, model_dir=model_dir)
    doc["limits"] = {"health_interval_s": 0.2, "breaker_cooldown_s": 0.5}
    router = Router(parse_config(doc))
    front = await Front.start(router, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{front.port}"
    async with aiohttp.ClientSession() as http:
        await wait_for(lambda: router.core.mode == "events")
        yield router, url, http
    await front.close()


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


async def post(http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> Any:
    async with http.post(url + path, json={"model": MODEL, **body}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def cached(doc: dict[str, Any]) -> int:
    return int(doc["usage"]["prompt_tokens_details"]["cached_tokens"])


def held(router: Router, pod: str, tokens: list[int]) -> int:
    """Leading blocks of ``tokens`` the router's index says ``pod`` holds."""
    return router.core.index.match(router.core.hashes(tokens, SALT)).run.get(f"pod/{pod}", 0)


async def test_the_router_tokenizes_as_vllm_does(
    routed: tuple[Router, str, aiohttp.ClientSession], vllms: list[VLLMServer]
) -> None:
    router, url, http = routed
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("chat", {"messages": chat("Which paddle for a 4 m kayak?")}),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}]}),
        ("completions", {"prompt": "Dry bags: 5 l, 10 l and 20 l. Prices in €, ünïcode."}),
    ]  # fmt: skip
    for kind, body in bodies:
        ours = prompt_tokens(body, kind, router.tokenizer)
        theirs = await post(http, vllms[0].url, "/tokenize", body)
        assert ours == theirs["tokens"], (kind, body)
    # token ids pass through as they are, on both sides
    doc = await post(http, url, "/v1/completions", {"prompt": [256, 72, 105], "max_tokens": 1})
    assert doc["usage"]["prompt_tokens"] == 3


async def test_repeats_land_on_the_engine_that_holds_them_and_the_index_agrees(
    routed: tuple[Router, str, aiohttp.ClientSession],
) -> None:
    router, url, http = routed
    users = [f"I am customer {k}; my order {k * 7919} has not arrived. " * 6 for k in range(6)]
    # first turns at once: the router spreads them over both engines by their queues
    await asyncio.gather(
        *(post(http, url, "/v1/chat/completions", {"messages": chat(u)}) for u in users)
    )
    holder = {}
    for user in users:
        tokens = prompt_tokens({"messages": chat(user)}, "chat", router.tokenizer)
        full = len(tokens) // BLOCK
        # vLLM's BlockStored events, mapped onto the pool's hashes, name these very blocks
        await wait_for(lambda t=tokens, f=full: max(held(router, p, t) for p in ("v0", "v1")) == f)
        holder[user] = next(p for p in ("v0", "v1") if held(router, p, tokens) == full)
    assert set(holder.values()) == {"v0", "v1"}, holder
    for user in users:
        body = {"messages": [*chat(user), {"role": "assistant", "content": "Let me look."},
                             {"role": "user", "content": "Thanks, any news?"}]}  # fmt: skip
        before = router.core.pods[holder[user]].served
        doc = await post(http, url, "/v1/chat/completions", body)
        assert router.core.pods[holder[user]].served == before + 1
        tokens = prompt_tokens({"messages": chat(user)}, "chat", router.tokenizer)
        # the whole first turn but its last token's block came from that engine's cache
        assert cached(doc) >= (len(tokens) // BLOCK - 1) * BLOCK, (cached(doc), len(tokens))


async def test_removed_blocks_leave_the_index_under_cache_pressure(
    routed: tuple[Router, str, aiohttp.ClientSession], vllms: list[VLLMServer]
) -> None:
    """The KV cache holds 256 blocks (budget.max 16 MiB): six prompts of ~59 blocks
    sent straight to one engine evict the first one's blocks."""
    router, _, http = routed
    prompts = [f"document {k}: " + f"kayak {k} paddle dry bag " * 75 for k in range(6)]
    tokens = [prompt_tokens({"prompt": p}, "completions", router.tokenizer) for p in prompts]
    for p in prompts:
        await post(http, vllms[1].url, "/v1/completions",
                   {"prompt": p, "max_tokens": 1, "cache_salt": SALT})  # fmt: skip
    f = router.vllm["v1"]
    await wait_for(lambda: held(router, "v1", tokens[-1]) == len(tokens[-1]) // BLOCK)
    assert held(router, "v1", tokens[0]) < len(tokens[0]) // BLOCK
    assert f.live and f.health()["errors"] == {} and f.gaps == 0


async def test_a_reset_prefix_cache_clears_the_pods_index(
    routed: tuple[Router, str, aiohttp.ClientSession], vllms: list[VLLMServer]
) -> None:
    router, _, http = routed
    prompt = "a prompt the reset will drop " * 8
    await post(http, vllms[0].url, "/v1/completions",
               {"prompt": prompt, "max_tokens": 1, "cache_salt": SALT})  # fmt: skip
    tokens = prompt_tokens({"prompt": prompt}, "completions", router.tokenizer)
    await wait_for(lambda: held(router, "v0", tokens) > 0)
    async with http.post(vllms[0].url + "/reset_prefix_cache") as r:
        assert r.status == 200
    # vLLM publishes AllBlocksCleared with its next step: the pod's whole index goes
    await post(http, vllms[0].url, "/v1/completions", {"prompt": "ok", "max_tokens": 1})
    await wait_for(lambda: router.core.index.node_blocks("pod/v0") == {})
    assert router.vllm["v0"].live and router.vllm["v0"].resyncs == 0


async def test_a_lost_batch_is_replayed_by_vllm(
    routed: tuple[Router, str, aiohttp.ClientSession], vllms: list[VLLMServer]
) -> None:
    router, _, http = routed
    f = router.vllm["v0"]
    real_apply, lost = f._apply, []

    def lose_one(seq: int, payload: bytes) -> None:
        if not lost:  # the batch never arrives (as when the socket's queue overflows)
            lost.append(seq)
            return
        real_apply(seq, payload)

    f._apply = lose_one  # type: ignore[method-assign]
    prompts = [f"first {k}: a long question about paddles " * 8 for k in range(2)]
    for p in prompts:
        await post(http, vllms[0].url, "/v1/completions",
                   {"prompt": p, "max_tokens": 1, "cache_salt": SALT})  # fmt: skip
        await asyncio.sleep(0.3)
    await wait_for(lambda: f.gaps == 1)
    f._apply = real_apply  # type: ignore[method-assign]
    tokens = prompt_tokens({"prompt": prompts[0]}, "completions", router.tokenizer)
    assert held(router, "v0", tokens) == len(tokens) // BLOCK  # replayed, not lost
    assert f.resyncs == 0 and f.live


async def test_a_killed_vllm_is_unhealthy_forgotten_and_followed_anew_after_restart(
    routed: tuple[Router, str, aiohttp.ClientSession], vllms: list[VLLMServer]
) -> None:
    router, url, http = routed
    before = "what was cached before the restart " * 10
    await post(http, vllms[1].url, "/v1/completions",
               {"prompt": before, "max_tokens": 1, "cache_salt": SALT})  # fmt: skip
    tokens = prompt_tokens({"prompt": before}, "completions", router.tokenizer)
    await wait_for(lambda: held(router, "v1", tokens) > 0)
    vllms[1].kill()
    await wait_for(lambda: not router.core.pods["v1"].healthy)
    assert router.core.index.node_blocks("pod/v1") == {}
    # the router keeps serving from the other engine meanwhile
    doc = await post(http, url, "/v1/completions", {"prompt": "still there?", "max_tokens": 2})
    assert doc["choices"]
    vllms[1].start()
    await asyncio.get_running_loop().run_in_executor(None, vllms[1].wait)
    await wait_for(lambda: router.core.pods["v1"].healthy and router.vllm["v1"].live, 30)
    after = "and what is cached after it " * 10
    await post(http, vllms[1].url, "/v1/completions",
               {"prompt": after, "max_tokens": 1, "cache_salt": SALT})  # fmt: skip
    fresh = prompt_tokens({"prompt": after}, "completions", router.tokenizer)
    await wait_for(lambda: held(router, "v1", fresh) == len(fresh) // BLOCK)
    assert held(router, "v1", tokens) == 0  # the old process's blocks are not back
