"""``kvmarina engine``: load the model, connect the KV store, serve HTTP.

Configuration flows CR -> operator -> environment -> here: every flag has a
``KVMARINA_ENGINE_*`` environment variable, which the operator sets.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from kvmarina.agent.client import AgentClient, AgentError, Budget, LocalPool
from kvmarina.engine.config import ModelConfig, ModelConfigError
from kvmarina.engine.kvstore import KVStore
from kvmarina.engine.paged import PagedStore
from kvmarina.engine.scheduler import Scheduler
from kvmarina.engine.server import EngineServer, Metrics, ServerConfig
from kvmarina.engine.weights import WeightsError, load_model
from kvmarina.hashing import HashContract
from kvmarina.layout import folder_identity
from kvmarina.logs import add_log_format_option, setup_logging
from kvmarina.quantity import parse_size
from kvmarina.tokenizer import load_tokenizer

log = logging.getLogger("kvmarina.engine")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"KVMARINA_ENGINE_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmarina engine", description="Run the reference engine.")
    p.add_argument("--model", default=_env("MODEL", "tiny"), help="model name clients ask for")
    p.add_argument("--model-dir", default=_env("MODEL_DIR"), help="Hugging Face model directory")
    p.add_argument(
        "--preset",
        default=_env("PRESET"),
        choices=["tiny", "small"],
        help="seeded random weights of a size preset (no model directory)",
    )
    p.add_argument("--revision", default=_env("REVISION", "main"))
    p.add_argument(
        "--dtype", default=_env("DTYPE", "float32"), choices=["float32", "float16", "bfloat16"]
    )
    p.add_argument("--seed", type=int, default=int(_env("SEED", "0") or 0))
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000") or 8000))
    p.add_argument("--max-model-len", type=int, default=int(_env("MAX_MODEL_LEN", "4096") or 0))
    p.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", "32") or 0))
    p.add_argument("--max-waiting", type=int, default=int(_env("MAX_WAITING", "256") or 0))
    p.add_argument(
        "--step-tokens",
        type=int,
        default=int(_env("STEP_TOKENS", "512") or 0),
        help="token budget of one step (prefill chunk size)",
    )
    p.add_argument("--block-size", type=int, default=int(_env("BLOCK_SIZE", "16") or 0))
    p.add_argument("--hash-algorithm", default=_env("HASH_ALGORITHM", "blake2b"))
    p.add_argument("--digest-bits", type=int, default=int(_env("DIGEST_BITS", "128") or 0))
    p.add_argument(
        "--trust-salt-header",
        action="store_true",
        default=_env("TRUST_SALT_HEADER", "") == "true",
        help="accept the router's x-kvmarina-salt header",
    )
    p.add_argument(
        "--default-salt",
        default=_env("DEFAULT_SALT", ""),
        help="salt when no trusted header is present (the serving's scope)",
    )
    p.add_argument(
        "--no-agent",
        action="store_true",
        default=_env("NO_AGENT", "") == "true",
        help="use a private in-process KV pool instead of the node agent",
    )
    p.add_argument(
        "--agent-socket",
        default=os.environ.get("KVMARINA_AGENT_SOCKET", "/var/run/kvmarina/agent.sock"),
        help="the node agent's unix socket",
    )
    p.add_argument(
        "--pod-name",
        default=_env("POD_NAME", ""),
        help="this engine's pod name: its load reports to the agent carry it, so that "
        "every router replica sees at once what the others sent here",
    )
    p.add_argument(
        "--credential-file",
        default=_env("CREDENTIAL_FILE"),
        help="file holding this serving's registration token (mounted by the operator)",
    )
    p.add_argument(
        "--kv-bytes",
        default=_env("KV_BYTES", "256Mi"),
        help="KV memory of the private pool (--no-agent)",
    )
    p.add_argument("--budget-min", default=_env("BUDGET_MIN", "0"), help="guaranteed KV bytes")
    p.add_argument("--budget-max", default=_env("BUDGET_MAX", "1Ti"), help="most KV bytes")
    p.add_argument("--priority", type=int, default=int(_env("PRIORITY", "100") or 100))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    add_log_format_option(p)
    return p


def build_store(args: argparse.Namespace, model_cfg: ModelConfig) -> KVStore:
    contract = HashContract(args.block_size, args.hash_algorithm, args.digest_bits // 8)
    layout = model_cfg.kv_layout(args.block_size)
    # a folder's identity comes from its config.json through the one function the
    # router and the planners use too, so all of them seed block hashes alike
    ident = (
        folder_identity(args.model_dir, args.model, args.revision, model_cfg.dtype, args.block_size)
        if args.model_dir
        else model_cfg.identity(args.model, args.revision, args.block_size)
    )
    identity = ident.canonical()
    client: AgentClient | LocalPool
    if args.no_agent:
        log.warning(
            "--no-agent: KV lives in a private in-process pool; nothing is shared "
            "with other engines on this node"
        )
        client = LocalPool(layout.bytes_per_block, parse_size(args.kv_bytes))
    else:
        token = _read_token(args.credential_file)
        blocks = layout.bytes_per_block
        budget = Budget(
            parse_size(args.budget_min) // blocks,
            max(1, parse_size(args.budget_max) // blocks),
            args.priority,
        )
        client = AgentClient(args.agent_socket, token, blocks, budget, pod=args.pod_name).connect()
    log.info("KV store ready: model identity %s, %s", identity, contract.describe())
    return PagedStore(client, layout, contract, identity)


def _read_token(path: str | None) -> str:
    if path is None:
        raise AgentError(
            "no --credential-file: the engine needs its serving's token to register with "
            "the agent (or run with --no-agent)"
        )
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise AgentError(f"cannot read the credential file {path}: {exc.strerror}") from None


async def _serve(server: EngineServer, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("engine serving %s on http://%s:%d", server.cfg.model_name, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    setup_logging(args.log_level, args.log_format)
    try:
        HashContract(args.block_size, args.hash_algorithm, args.digest_bits // 8)
        preset_name = None if args.model_dir else (args.preset or "tiny")
        model = load_model(args.model_dir, preset_name, args.dtype, args.seed)
    except (ModelConfigError, WeightsError, ValueError) as exc:
        print(f"kvmarina engine: {exc}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.model_dir)
    try:
        store = build_store(args, model.config)
    except (AgentError, ValueError) as exc:
        print(f"kvmarina engine: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics()
    max_len = min(args.max_model_len, model.config.max_position)
    scheduler = Scheduler(
        model,
        store,
        eos_id=tokenizer.eos_id,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        step_tokens=args.step_tokens,
        max_model_len=max_len,
        on_step=metrics.on_step,
    )
    cfg = ServerConfig(args.model, max_len, args.trust_salt_header, args.default_salt)
    scheduler.start()
    try:
        asyncio.run(
            _serve(EngineServer(cfg, scheduler, store, tokenizer, metrics), args.host, args.port)
        )
    finally:
        scheduler.stop()
    return 0
