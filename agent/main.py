"""``kvmarina agent``: the node agent process.

Serves the pool on a unix socket (engines) and HTTP (health, metrics, stats,
events). On SIGTERM it stops accepting, publishes ``cleared``, and exits; a
restarted agent has a new boot id and an empty index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web

from kvmarina.agent.api.http import build_app
from kvmarina.agent.api.protocol import AgentProtocol
from kvmarina.agent.config import AgentConfig, ConfigError, load_config
from kvmarina.agent.memory import RegionError
from kvmarina.agent.node.credentials import CredentialError, CredentialStore
from kvmarina.agent.node.pool import Pool
from kvmarina.agent.transfer.service import TransferError, start_transfer_service
from kvmarina.logs import add_log_format_option, setup_logging

log = logging.getLogger("kvmarina.agent")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvmarina agent", description="Run the node agent.")
    p.add_argument(
        "--config",
        default=os.environ.get("KVMARINA_AGENT_CONFIG"),
        help="agent config file (YAML or JSON)",
    )
    p.add_argument("--node", help="node name (overrides the config)")
    p.add_argument("--socket", dest="socket_path", help="unix socket path")
    p.add_argument("--http-port", type=int, help="HTTP port (0 picks one)")
    p.add_argument("--credentials", dest="credentials_file", help="serving credentials file")
    p.add_argument("--log-level", default=os.environ.get("KVMARINA_LOG_LEVEL", "info"))
    add_log_format_option(p)
    return p.parse_args(argv)


async def serve(cfg: AgentConfig, ready_file: str | None = None) -> None:
    creds = CredentialStore.load(cfg.credentials_file)
    pool = Pool(
        node=cfg.node,
        backend=cfg.backend,
        page_size=cfg.page_size,
        device_pages=cfg.device_pages,
        host_pages=cfg.host_pages,
        policy=cfg.eviction,
        block_tokens=cfg.contract().block_size,
        checksum=cfg.migration.checksum,
    )
    pool.events.max_queue = cfg.event_queue
    proto = AgentProtocol(pool, creds, cfg.contract().digest_bytes, cfg.reclaim_timeout_s)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cfg.socket_path)
    os.makedirs(os.path.dirname(cfg.socket_path) or ".", exist_ok=True)
    try:
        unix = await asyncio.start_unix_server(proto.handle, path=cfg.socket_path)
    except PermissionError as exc:
        folder = os.path.dirname(cfg.socket_path) or "."
        st = os.stat(folder)
        raise ConfigError(
            f"cannot create the agent socket {cfg.socket_path}: {exc.strerror}. The folder "
            f"belongs to uid {st.st_uid} (mode {st.st_mode & 0o777:o}) and this agent runs as "
            f"uid {os.getuid()}: hand the folder to this user (the operator's DaemonSet does, "
            "with its socket-dir init container) or run the agent as its owner"
        ) from exc
    os.chmod(cfg.socket_path, 0o660)
    ready = asyncio.Event()
    runner = web.AppRunner(build_app(pool, ready), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.http_host, cfg.http_port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    extras = await _start_extras(cfg, pool, proto)
    ready.set()
    log.info(
        "agent %s ready: socket %s, http %s:%d, %d device pages, %d host pages, boot %s",
        cfg.node,
        cfg.socket_path,
        cfg.http_host,
        port,
        cfg.device_pages,
        cfg.host_pages,
        pool.events.boot_id,
    )
    print(f"kvmarina agent {cfg.node} ready http://{cfg.http_host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("agent %s stopping", cfg.node)
    unix.close()
    pool.clear()
    await asyncio.sleep(0.05)  # let subscribers receive 'cleared'
    for extra in extras:
        await extra()
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cfg.socket_path)


async def _start_extras(cfg: AgentConfig, pool: Pool, proto: AgentProtocol) -> list:  # type: ignore[type-arg]
    """Services that register their own operations (peer transfers)."""
    return [await start_transfer_service(cfg, pool, proto)]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    overrides = {k: getattr(args, k) for k in ("node", "socket_path", "credentials_file")}
    overrides["http_port"] = args.http_port
    try:
        cfg = load_config(args.config, overrides)
        asyncio.run(serve(cfg))
    except (ConfigError, CredentialError, RegionError, TransferError) as exc:
        print(f"kvmarina agent: {exc}", file=sys.stderr)
        return 2
    return 0
