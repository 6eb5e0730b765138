"""The pool's mTLS material, as the operator makes it, works in the agents' TLS setup."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from kvmarina.agent.transfer.service import tls_contexts
from kvmarina.operator.pki import make_pool_pki


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_two_agents_of_a_pool_complete_a_mutual_tls_handshake(tmp_path: Path) -> None:
    files = await make_pool_pki("p")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    server_ctx, client_ctx = tls_contexts(str(tmp_path))

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.readexactly(4))
        await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        w.close()
        # another pool's certificate is refused
        other = tmp_path / "other"
        other.mkdir()
        for name, text in (await make_pool_pki("q")).items():
            (other / name).write_text(text)
        _, foreign = tls_contexts(str(other))
        with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=foreign)
            w.write(b"ping")
            await r.readexactly(4)
    finally:
        server.close()
        await server.wait_closed()
