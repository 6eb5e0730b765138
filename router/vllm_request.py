"""What the router changes in a request body bound for a vLLM pod.

* ``cache_salt``: vLLM salts its own prefix cache with it and reports it in its KV
  events; the router's salt (the serving's sharing scope and trusted tenant) replaces
  any a client sent, so vLLM never shares a prefix the scope does not allow.
* ``kv_transfer_params.kvmarina_pull``: the pull hint (``x-kvmarina-pull`` for the
  reference engine), which vLLM hands to kvmarina's KV connector; a client's is
  dropped, or a client could have the node's agent fetch from a peer of its choosing.
"""

from __future__ import annotations

from typing import Any

from kvmarina.headers import PullHint

PULL_KEY = "kvmarina_pull"  # kvmarina.connector.vllm reads it


def vllm_request(body: dict[str, Any], salt: str) -> dict[str, Any]:
    out = {**body, "cache_salt": salt}
    params = out.get("kv_transfer_params")
    if isinstance(params, dict) and PULL_KEY in params:
        out["kv_transfer_params"] = {k: v for k, v in params.items() if k != PULL_KEY} or None
        if out["kv_transfer_params"] is None:
            del out["kv_transfer_params"]
    return out


def with_pull(body: dict[str, Any], hint: PullHint) -> dict[str, Any]:
    params = body.get("kv_transfer_params")
    params = dict(params) if isinstance(params, dict) else {}
    params[PULL_KEY] = {"node": hint.node, "agent": hint.agent, "blocks": hint.blocks}
    return {**body, "kv_transfer_params": params}
