"""Block migration between agent processes: authenticated, verified, never partial."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kvmarina.agent.client import AgentClient

from .conftest import AgentProc, agent_process, write_config

WRITER = str(Path(__file__).parent / "writer.py")
N = 12


def migration(tmp: Path, token: str, timeout: float = 3.0, **extra: object) -> dict[str, object]:
    tok = tmp / "transfer.token"
    tok.write_text(token)
    return {
        "port": 0,
        "host": "127.0.0.1",
        "auth": "token",
        "token_file": str(tok),
        "timeout_s": timeout,
        **extra,
    }


@contextmanager
def agent_pair(tmp: Path, **extra: object) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Agents a and b of one pool; ``extra``: migration settings of both."""
    with ExitStack() as stack:
        agents = []
        for name in ("a", "b"):
            d = tmp / name
            d.mkdir()
            mig = migration(d, "shared-pool-token-0123456789", **extra)
            agents.append(stack.enter_context(agent_process(d, node=f"node-{name}", migration=mig)))
        yield agents[0], agents[1]


@pytest.fixture
def two_agents(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    with agent_pair(tmp_path) as pair:  # default settings: 4 streams per peer
        yield pair


@pytest.fixture
def one_stream(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    with agent_pair(tmp_path, streams_per_peer=1) as pair:
        yield pair


def fill(agent: AgentProc, n: int = N) -> list[bytes]:
    proc = subprocess.run(
        [sys.executable, WRITER, agent.socket, "tok-chat", str(n), "exit"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "READY" in proc.stdout, proc.stderr
    return [bytes([i + 1]) * 16 for i in range(n)]


def transfer_port(agent: AgentProc) -> int:
    return int(agent.stats()["transfer"]["port"])  # type: ignore[index]


def test_pull_a_long_prefix_then_lookup_returns_the_same_bytes(two_agents) -> None:  # type: ignore[no-untyped-def]
    a, b = two_agents
    hashes = fill(a)
    client = AgentClient(b.socket, "tok-code", 4096).connect()
    reply = client.pull(a.url, [*hashes, b"\xfe" * 16])
    assert reply["pulled"] == N and reply["missing"] == [b"\xfe" * 16] and reply["failed"] == []
    hits = client.lookup(hashes)
    assert len(hits) == N
    for i, h in enumerate(hits):
        block = client.block(h.page, h.index)
        assert int(block.min()) == int(block.max()) == i + 1
    stats = b.stats()["transfer"]["peers"][a.url]  # type: ignore[index]
    assert stats["bytes"] == N * 4096 and stats["gbps"] > 0
    assert b.stats()["stats"]["committed"] == N  # type: ignore[index]
    client.close()


def test_concurrent_pulls_of_the_same_blocks_fetch_once(two_agents) -> None:  # type: ignore[no-untyped-def]
    a, b = two_agents
    hashes = fill(a)
    results: list[dict[str, object]] = []

    def pull() -> None:
        c = AgentClient(b.socket, "tok-chat", 4096).connect()
        results.append(c.pull(a.url, hashes))
        c.close()

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3
    assert b.stats()["transfer"]["peers"][a.url]["bytes"] == N * 4096  # type: ignore[index]


def test_wrong_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    with (
        agent_process(
            tmp_path / "x",
            node="x",
            migration=migration(tmp_path / "x", "the-real-token-0123456789"),
        ) as a,
        agent_process(
            tmp_path / "y",
            node="y",
            migration=migration(tmp_path / "y", "a-forged-token-0123456789"),
        ) as b,
    ):
        hashes = fill(a, 2)
        c = AgentClient(b.socket, "tok-chat", 4096).connect()
        reply = c.pull(a.url, hashes)
        assert reply["pulled"] == 0 and reply["failed"] == hashes and "token" in reply["error"]
        assert c.lookup(hashes) == []
        # the serving agent counts a refusal once its handshake thread is back, which
        # may be after the peer read the refusal
        deadline = time.monotonic() + 10
        while a.stats()["transfer"]["refused"] < 1:  # type: ignore[index]
            assert time.monotonic() < deadline, "the refusal was never counted"
            time.sleep(0.02)
        c.close()


class Proxy:
    """A TCP proxy between agents that can corrupt, cut or stall the stream."""

    def __init__(self, target: int, mode: str, after: int) -> None:
        self.target, self.mode, self.after = target, mode, after
        self.port = 0
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)

        async def up() -> None:
            while data := await cr.read(65536):
                uw.write(data)
                await uw.drain()

        async def down() -> None:
            seen = 0
            while data := await ur.read(65536):
                if seen + len(data) > self.after:
                    cut = max(0, self.after - seen)
                    if self.mode == "corrupt":
                        data = data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :]
                        self.after = 1 << 62
                    elif self.mode == "cut":
                        cw.write(data[:cut])
                        await cw.drain()
                        cw.close()
                        uw.close()
                        return
                    elif self.mode == "stall":
                        cw.write(data[:cut])
                        await asyncio.sleep(60)
                        return
                seen += len(data)
                cw.write(data)
                await cw.drain()

        await asyncio.gather(up(), down(), return_exceptions=True)

    def close(self) -> None:
        def shutdown() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_later(0.1, self.loop.stop)

        self.loop.call_soon_threadsafe(shutdown)
        self.thread.join(5)


@pytest.mark.parametrize("mode", ["corrupt", "cut", "stall"])
def test_faults_on_the_wire_leave_nothing_partial_visible(one_stream, mode: str) -> None:  # type: ignore[no-untyped-def]
    a, b = one_stream
    hashes = fill(a)
    # handshake frames are small: 600 bytes in is inside the first block's payload
    proxy = Proxy(transfer_port(a), mode, after=600 + 5 * 4096)
    try:
        c = AgentClient(b.socket, "tok-chat", 4096).connect()
        reply = c.pull(f"127.0.0.1:{proxy.port}", hashes)
        assert reply["failed"] and reply["pulled"] + len(reply["failed"]) == N
        for h in reply["failed"]:
            assert c.lookup([h]) == []  # a damaged or partial block never becomes visible
        got = c.lookup(hashes)
        assert len(got) <= reply["pulled"]
        for i, h in enumerate(got):  # what is visible is intact
            block = c.block(h.page, h.index)
            assert int(block.min()) == int(block.max()) == i + 1
        if mode == "corrupt":
            assert reply["failed"] == [hashes[5]] and reply["pulled"] == N - 1
            assert b.stats()["transfer"]["corrupt"] == 1  # type: ignore[index]
        c.close()
    finally:
        proxy.close()


def _certs(d: Path, cn: str, ca_name: str = "ca") -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    d.mkdir(parents=True, exist_ok=True)
    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        f"/CN={ca_name}",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        "-subj",
        f"/CN={cn}",
    )
    ssl(
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "tls.crt",
        "-days",
        "1",
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_mutual_tls_pull_and_a_foreign_certificate_refused(tmp_path: Path) -> None:
    good, foreign = tmp_path / "pki", tmp_path / "other-pki"
    _certs(good, "agent")
    _certs(foreign, "intruder", "other-ca")
    dirs = {n: tmp_path / n for n in ("a", "b", "c")}
    for d in dirs.values():
        d.mkdir()

    def mtls(d: Path, certs: Path) -> dict[str, object]:
        return {
            **migration(d, "shared-pool-token-0123456789"),
            "auth": "mtls",
            "cert_dir": str(certs),
        }

    with (
        agent_process(dirs["a"], node="a", migration=mtls(dirs["a"], good)) as a,
        agent_process(dirs["b"], node="b", migration=mtls(dirs["b"], good)) as b,
        agent_process(dirs["c"], node="c", migration=mtls(dirs["c"], foreign)) as c,
    ):
        hashes = fill(a, 3)
        ok = AgentClient(b.socket, "tok-chat", 4096).connect()
        assert ok.pull(a.url, hashes)["pulled"] == 3
        bad = AgentClient(c.socket, "tok-chat", 4096).connect()
        reply = bad.pull(a.url, hashes)
        assert reply["pulled"] == 0 and reply["failed"] == hashes
        assert bad.lookup(hashes) == []
        ok.close()
        bad.close()


def test_multi_stream_pull_drops_only_the_corrupted_block_mid_run(tmp_path: Path) -> None:
    """Three streams of one run each (4 blocks); a byte flipped in the second block
    of whichever run crosses the proxy first: that block alone is dropped, the
    blocks after it in the same run and the other streams' runs land intact."""
    with agent_pair(tmp_path, streams_per_peer=3, run_bytes=4 * 4096) as (a, b):
        hashes = fill(a)
        proxy = Proxy(transfer_port(a), "corrupt", after=600 + 4096)
        try:
            c = AgentClient(b.socket, "tok-chat", 4096).connect()
            reply = c.pull(f"127.0.0.1:{proxy.port}", hashes)
            assert proxy.connections == 3  # the hash list was split over three streams
            assert reply["pulled"] == N - 1 and len(reply["failed"]) == 1, reply
            bad = hashes.index(reply["failed"][0])
            assert bad % 4 == 1  # the second block of its run
            assert b.stats()["transfer"]["corrupt"] == 1  # type: ignore[index]
            for i, h in enumerate(hashes):
                got = c.lookup([h])
                if i == bad:
                    assert got == []
                    continue
                block = c.block(got[0].page, got[0].index)
                assert int(block.min()) == int(block.max()) == i + 1
                c.release([h])
            c.close()
        finally:
            proxy.close()


def test_pull_larger_than_one_run_per_stream_and_a_bad_fetch_is_refused(tmp_path: Path) -> None:
    """More runs than streams: streams take runs until none are left. A peer that
    sends a malformed fetch gets an error frame, not blocks."""
    with agent_pair(tmp_path, streams_per_peer=2, run_bytes=4096) as (a, b):
        hashes = fill(a)
        c = AgentClient(b.socket, "tok-chat", 4096).connect()
        reply = c.pull(a.url, hashes)
        assert reply["pulled"] == N and reply["failed"] == [] and "error" not in reply
        assert len(c.lookup(hashes)) == N
        c.close()
        assert _raw_fetch(transfer_port(a), {"op": "fetch", "scope": 3, "hashes": []}) == {
            "ok": False,
            "error": "scope must be a string",
        }


def _raw_fetch(port: int, request: dict[str, object]) -> object:
    """Authenticate with the shared token by hand, send one request, read one frame."""
    from kvmarina.agent.transfer.auth import client_handshake
    from kvmarina.agent.transfer.wire import dial, recv_frame, send_frame

    conn = dial("127.0.0.1", port, None, 5.0)
    try:
        client_handshake(conn.sock, b"shared-pool-token-0123456789", "test", "a")
        send_frame(conn.sock, request)
        return recv_frame(conn.sock)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"streams_per_peer": 0}, "migration.streams_per_peer 0"),
        ({"streams_per_peer": 65}, "use 1..64"),
        ({"run_bytes": 0}, "migration.run_bytes 0"),
        ({"auth": "psk"}, "use token or mtls"),
        ({"timeout_s": 0}, "migration.timeout_s 0"),
        ({"stream": 2}, "unknown key(s) stream"),
    ],
)
def test_bad_migration_settings_are_refused_by_name(
    tmp_path: Path, setting: dict[str, object], words: str
) -> None:
    from kvmarina.agent.config import ConfigError, load_config

    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"migration": setting}))
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(str(path))


def test_mtls_without_a_certificate_directory_refuses_to_start(tmp_path: Path) -> None:
    """Never a silent fall back to token-only when the pool asked for mutual TLS."""
    cfg = write_config(tmp_path, migration={**migration(tmp_path, "t" * 20), "auth": "mtls"})
    proc = subprocess.run(
        [sys.executable, "-m", "kvmarina.cli", "agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "migration.cert_dir is not set" in proc.stderr


def test_an_agent_stopping_mid_pull_does_not_wait_out_the_transfer_timeout(
    tmp_path: Path,
) -> None:
    """A stream stalled by its peer, a 30 s transfer timeout: SIGTERM still ends the
    agent in seconds (open streams are shut down, so no worker thread lingers)."""
    with agent_pair(tmp_path, timeout_s=30, streams_per_peer=1) as (a, b):
        hashes = fill(a)
        proxy = Proxy(transfer_port(a), "stall", after=600 + 4096)
        replies: list[object] = []

        def pull() -> None:
            c = AgentClient(b.socket, "tok-chat", 4096, timeout=60).connect()
            try:
                replies.append(c.pull(f"127.0.0.1:{proxy.port}", hashes))
            except (OSError, RuntimeError) as exc:  # the agent went away mid-call
                replies.append(exc)

        puller = threading.Thread(target=pull, daemon=True)
        try:
            puller.start()
            deadline = time.monotonic() + 20
            while proxy.connections == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the stream is now blocked on the stalled peer
            t0 = time.monotonic()
            b.proc.terminate()
            b.proc.wait(20)
            assert time.monotonic() - t0 < 8
            puller.join(10)
            assert replies  # the puller was answered or saw the agent go
        finally:
            proxy.close()


def test_a_peer_restarted_on_a_new_transfer_port_is_found_again(tmp_path: Path) -> None:
    """Pulls by agent URL remember the peer's transfer port; when the peer comes
    back on another one (port 0, as in local mode), the next pull asks again."""
    for name in ("a", "b", "a2"):
        (tmp_path / name).mkdir()
    token = "shared-pool-token-0123456789"
    with agent_process(tmp_path / "b", node="b", migration=migration(tmp_path / "b", token)) as b:
        c = AgentClient(b.socket, "tok-chat", 4096).connect()
        with agent_process(
            tmp_path / "a", node="a", migration=migration(tmp_path / "a", token)
        ) as a:
            url, first = a.url, transfer_port(a)
            hashes = fill(a, 2)
            assert c.pull(url, hashes[:1])["pulled"] == 1
        http_port = int(url.rsplit(":", 1)[1])
        with agent_process(
            tmp_path / "a2",
            node="a",
            http_port=http_port,
            migration=migration(tmp_path / "a2", token),
        ) as a2:
            fill(a2, 2)
            assert transfer_port(a2) != first
            reply = c.pull(url, hashes[1:])
            assert reply["pulled"] == 1 and reply["failed"] == [], reply
        c.close()


def test_a_pull_into_pages_kept_from_an_earlier_pull_is_verified_the_same(one_stream) -> None:  # type: ignore[no-untyped-def]
    """The receiver's pool keeps freed pages' memory for their scope, so a second
    pull is read straight into backed pages: bytes land intact and a flipped
    byte is still caught before the block becomes visible."""
    a, b = one_stream
    hashes = fill(a)
    c = AgentClient(b.socket, "tok-chat", 4096).connect()
    assert c.pull(a.url, hashes)["pulled"] == N
    clear = urllib.request.Request(b.url + "/admin/clear", method="POST")
    urllib.request.urlopen(clear, timeout=10).read()
    assert c.lookup(hashes) == [] and b.stats()["pages"]["device"]["kept"] > 0  # type: ignore[index]
    proxy = Proxy(transfer_port(a), "corrupt", after=600 + 5 * 4096)
    try:
        reply = c.pull(f"127.0.0.1:{proxy.port}", hashes)
        assert reply["failed"] == [hashes[5]] and reply["pulled"] == N - 1
        assert b.stats()["transfer"]["corrupt"] == 1  # type: ignore[index]
        for i, h in enumerate(hashes):
            got = c.lookup([h])
            if i == 5:
                assert got == []
                continue
            block = c.block(got[0].page, got[0].index)
            assert int(block.min()) == int(block.max()) == i + 1
            c.release([h])
    finally:
        proxy.close()
        c.close()


def test_crc32c_pools_verify_with_crc32c_and_agents_that_disagree_refuse(tmp_path: Path) -> None:
    """``migration.checksum: crc32c``: blocks travel with CRC32C and a flipped byte
    is caught; an agent set to xxh3 pulling from it fails with a message naming
    both, and nothing it received becomes visible."""
    with agent_pair(tmp_path, checksum="crc32c", streams_per_peer=1) as (a, b):
        hashes = fill(a)
        c = AgentClient(b.socket, "tok-chat", 4096).connect()
        proxy = Proxy(transfer_port(a), "corrupt", after=600 + 5 * 4096)
        try:
            reply = c.pull(f"127.0.0.1:{proxy.port}", hashes)
            assert reply["failed"] == [hashes[5]] and reply["pulled"] == N - 1, reply
        finally:
            proxy.close()
            c.close()
        d = tmp_path / "x"
        d.mkdir()
        mig = migration(d, "shared-pool-token-0123456789")  # xxh3, the default
        with agent_process(d, node="node-x", migration=mig) as x:
            cx = AgentClient(x.socket, "tok-chat", 4096).connect()
            reply = cx.pull(a.url, hashes)
            assert reply["pulled"] == 0 and reply["failed"] == hashes
            assert "'crc32c'" in reply["error"] and "'xxh3'" in reply["error"], reply
            assert cx.lookup(hashes) == []
            cx.close()


def test_a_bad_checksum_setting_is_refused_by_name() -> None:
    from kvmarina.agent.config import ConfigError, MigrationConfig

    with pytest.raises(ConfigError, match=r"migration\.checksum 'md5': use xxh3 or crc32c"):
        MigrationConfig(checksum="md5")


def test_per_peer_bandwidth_is_in_stats_and_metrics(two_agents) -> None:  # type: ignore[no-untyped-def]
    a, b = two_agents
    hashes = fill(a)
    c = AgentClient(b.socket, "tok-code", 4096).connect()
    assert c.pull(a.url, hashes)["pulled"] == N
    c.close()
    gbps = b.stats()["transfer"]["peers"][a.url]["gbps"]  # type: ignore[index]
    with urllib.request.urlopen(b.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("kvmarina_agent_transfer_gbps{"))
    assert f'peer="{a.url}"' in line and float(line.rsplit(" ", 1)[1]) == pytest.approx(gbps)
    assert gbps > 0


def test_a_pool_with_migration_off_opens_no_port_and_refuses_pulls(tmp_path: Path) -> None:
    from kvmarina.agent.client import AgentError

    with agent_pair(tmp_path) as (a, _):
        hashes = fill(a, 2)
        (tmp_path / "off").mkdir()
        mig = migration(tmp_path / "off", "shared-pool-token-0123456789", enabled=False)
        with agent_process(tmp_path / "off", node="off", migration=mig) as off:
            assert "transfer" not in off.stats()
            c = AgentClient(off.socket, "tok-chat", 4096).connect()
            with pytest.raises(AgentError, match=r"spec.migration.enabled: false"):
                c.pull(a.url, hashes)
            assert c.lookup(hashes) == []
            c.close()
