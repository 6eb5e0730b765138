"""Validation beyond the schema: combinations of a serving and its pool that cannot run.

Each check returns messages that name the field and say what to change; a serving
with any message gets ``InvalidSpec`` and no children.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmarina.operator.components import PlanError, effective_scope, model_identity
from kvmarina.quantity import format_bytes
from kvmarina.specs import KVCachePoolSpec, ModelServingSpec

# Engine flags the operator derives from the pool; a serving may not contradict them.
CONTRACT_FLAGS: dict[str, Callable[[KVCachePoolSpec], str]] = {
    "--block-size": lambda p: str(p.hashing.block_size),
    "--hash-algorithm": lambda p: p.hashing.algorithm,
    "--digest-bits": lambda p: str(p.hashing.digest_bits),
}
OWNED_FLAGS = ("--agent-socket", "--credential-file", "--port", "--host")


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs of an argument list."""
    out: dict[str, str] = {}
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        if "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        else:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            out[a] = "" if nxt.startswith("--") else nxt
    return out


def check_serving(serving: ModelServingSpec, pool_name: str, pool: KVCachePoolSpec) -> list[str]:
    problems: list[str] = []
    try:
        effective_scope(serving, pool)
        model_identity(serving, pool)
    except PlanError as exc:
        problems.append(str(exc))
    device = pool.memory.device_bytes
    b = serving.budget
    if b.max_bytes > device:
        problems.append(
            f"spec.budget.max {b.max} exceeds KVCachePool {pool_name!r}'s device memory per "
            f"node ({format_bytes(device)}); lower the budget or grow the pool"
        )
    if b.min_bytes > device:
        problems.append(
            f"spec.budget.min {b.min} exceeds KVCachePool {pool_name!r}'s device memory per "
            f"node ({format_bytes(device)})"
        )
    if b.max_bytes and b.max_bytes < pool.memory.page_bytes:
        problems.append(
            f"spec.budget.max {b.max} is smaller than one page of the pool "
            f"({format_bytes(pool.memory.page_bytes)}); raise it"
        )
    flags = flag_values(serving.engine.args)
    for flag, want in CONTRACT_FLAGS.items():
        if flag in flags and flags[flag] != want(pool):
            problems.append(
                f"spec.engine.args sets {flag} {flags[flag]} but KVCachePool {pool_name!r} "
                f"hashes with {flag.removeprefix('--')} {want(pool)}; remove the flag "
                "(the operator passes the pool's contract)"
            )
    for flag in OWNED_FLAGS:
        if flag in flags:
            problems.append(f"spec.engine.args sets {flag}, which the operator owns; remove it")
    return problems


def overcommitted(pool: KVCachePoolSpec, minimums: dict[str, int]) -> str | None:
    """A message when the servings' guaranteed minimums exceed a node's device memory."""
    total = sum(minimums.values())
    if total <= pool.memory.device_bytes:
        return None
    return (
        f"guaranteed minimums of {len(minimums)} serving(s) add up to {format_bytes(total)}, "
        f"more than the {format_bytes(pool.memory.device_bytes)} of device memory per node; "
        "lower spec.budget.min of some servings"
    )
