"""How the router tokenizes for vLLM: its own tokenizer and chat template from the model
folder, against asking the engine (vLLM's ``POST /tokenize``) for every request.

Starts one vLLM server (``.venv-vllm``) on the preset ``small`` exported as a folder,
then tokenizes the same chat and completion bodies both ways: the router's way
(``kvmarina.prompts.prompt_tokens``) and a round trip to the engine on loopback (the
baseline). Prints the median time per request of each, their ratio, and whether every
body gave identical token ids.

    python benchmarks/tokenization.py [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

from kvmarina.engine.weights import export_preset
from kvmarina.local.fleet import load_resources
from kvmarina.local.vllm import VLLMProcess, vllm_python
from kvmarina.prompts import prompt_tokens
from kvmarina.tokenizer import load_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vllm-local.yaml"


def bodies(n: int) -> list[tuple[str, dict[str, Any]]]:
    system = "You are the assistant of a kayak shop; answer briefly. " * 8
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        doc = f"customer {i}: order {i * 7919} of paddles and dry bags, " * (5 + i % 40)
        if i % 2:
            out.append(("completions", {"prompt": system + doc}))
        else:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": doc}]
            out.append(("chat", {"messages": messages}))
    return out


async def remote(url: str, work: list[tuple[str, dict[str, Any]]]) -> tuple[list[float], list]:
    times, ids = [], []
    async with aiohttp.ClientSession() as http:
        for _, body in work:
            t0 = time.perf_counter()
            async with http.post(url + "/tokenize", json={"model": "small-vllm", **body}) as r:
                doc = await r.json()
            times.append(time.perf_counter() - t0)
            ids.append(doc["tokens"])
    return times, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvm-tok-"))
    folder = str(export_preset("small", "float32", tmp / "small"))
    (pool,), (serving,) = load_resources([str(EXAMPLE)])
    server = VLLMProcess(vllm_python(), serving.spec, pool.spec, folder, tmp / "vllm.log")
    server.start()
    try:
        server.wait()
        tok = load_tokenizer(folder)
        work = bodies(args.requests)
        asyncio.run(remote(server.url, work[:10]))  # warm the server's path
        local_t, local_ids = [], []
        for kind, body in work:
            t0 = time.perf_counter()
            local_ids.append(prompt_tokens(body, kind, tok))
            local_t.append(time.perf_counter() - t0)
        remote_t, remote_ids = asyncio.run(remote(server.url, work))
    finally:
        server.kill()
    med_local = statistics.median(local_t) * 1e6
    med_remote = statistics.median(remote_t) * 1e6
    same = sum(a == b for a, b in zip(local_ids, remote_ids, strict=True))
    tokens = statistics.median(len(i) for i in local_ids)
    report(
        [
            ("way", "median us / request", "identical ids"),
            ("router (folder tokenizer)", f"{med_local:.0f}", f"{same}/{len(work)}"),
            ("vLLM POST /tokenize", f"{med_remote:.0f}", "(baseline)"),
        ],
        {
            "local_us_p50": round(med_local, 1),
            "engine_us_p50": round(med_remote, 1),
            "local_over_engine": round(med_local / med_remote, 3),
            "identical": same,
            "requests": len(work),
            "median_prompt_tokens": tokens,
        },
    )
    return 0 if same == len(work) else 1


if __name__ == "__main__":
    raise SystemExit(main())
