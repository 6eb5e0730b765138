"""The agent as a real process: shared pages across processes, isolation, faults, events."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmarina.agent.client import AgentClient, AgentError, AgentFull, AgentUnavailable, Budget
from kvmarina.agent.client.connection import RECV_BYTES
from kvmarina.events import LoadRecord, Snapshot, from_wire
from kvmarina.framing import HEADER, FrameDecoder, encode_frame

from .conftest import AgentProc, agent_process

WRITER = str(Path(__file__).parent / "writer.py")


def run_writer(agent: AgentProc, token: str, n: int, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, WRITER, agent.socket, token, str(n), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.strip() == "READY", proc.stderr.read() if proc.stderr else ""
    return proc


def test_second_process_reads_first_process_blocks_without_copy(agent: AgentProc) -> None:
    writer = run_writer(agent, "tok-chat", 5, "exit")
    writer.wait(10)
    reader = AgentClient(agent.socket, "tok-code", 4096).connect()  # same namespace scope
    hashes = [bytes([i + 1]) * 16 for i in range(5)] + [b"\xee" * 16]
    hits = reader.lookup(hashes)
    assert [h.hash for h in hits] == hashes[:5]  # longest run from block 0
    base = reader.region.data_ptr()  # type: ignore[union-attr]
    for i, h in enumerate(hits):
        view = reader.block(h.page, h.index)
        assert int(view.min()) == int(view.max()) == i + 1
        # a view into this process's mapping of the shared region: no copy was made
        assert view.data_ptr() == base + reader.offset(h.page, h.index)
    reader.release(hashes[:5])
    reader.close()


def test_other_scope_can_neither_find_nor_read(agent: AgentProc) -> None:
    writer = run_writer(agent, "tok-chat", 3, "exit")
    writer.wait(10)
    chat = AgentClient(agent.socket, "tok-chat", 4096).connect()
    other = AgentClient(agent.socket, "tok-other", 4096).connect()
    private = AgentClient(agent.socket, "tok-private", 4096).connect()
    hashes = [bytes([i + 1]) * 16 for i in range(3)]
    hit = chat.lookup(hashes)[0]
    assert other.lookup(hashes) == [] and private.lookup(hashes) == []
    # its own region at the same offset holds none of team-a's bytes
    assert int(other.block(hit.page, hit.index).max()) == 0
    assert other.info["scope"] == "ns/team-b" and chat.info["scope"] == "ns/team-a"
    for c in (chat, other, private):
        c.close()


def test_unknown_credential_gets_nothing(agent: AgentProc) -> None:
    with pytest.raises(AgentError, match="unknown credential"):
        AgentClient(agent.socket, "tok-forged", 4096).connect()
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent.socket)
    s.sendall(encode_frame({"op": "lookup", "hashes": []}))
    data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(16))
    assert anc == [] and b"first request must be 'register'" in data
    s.close()


def test_killed_client_has_its_leases_reclaimed_and_shared_blocks_survive(agent: AgentProc) -> None:
    writer = run_writer(agent, "tok-chat", 4, "hold")
    holder = run_writer(agent, "tok-code", 6, "lease-only")
    usage = agent.stats()["usage"]
    assert usage == {"team-a/chat": 4, "team-a/code": 6}  # type: ignore[comparison-overlap]
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    deadline = time.monotonic() + 5
    while agent.stats()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = agent.stats()
    assert stats["sessions"] == 0 and stats["usage"]["team-a/code"] == 0  # type: ignore[index]
    reader = AgentClient(agent.socket, "tok-chat", 4096).connect()
    assert len(reader.lookup([bytes([i + 1]) * 16 for i in range(4)])) == 4
    reader.close()


def test_engines_see_the_blocks_another_engine_is_computing(agent: AgentProc) -> None:
    """Over the socket: a lookup with ``claim`` makes the missing blocks this
    engine's to compute; another engine's lookup says how many past its hits are
    being computed; a commit, an unclaim or a closed connection ends a claim."""
    a = AgentClient(agent.socket, "tok-chat", 4096).connect()
    b = AgentClient(agent.socket, "tok-chat", 4096).connect()
    hs = [bytes([n + 1]) * 16 for n in range(8)]
    assert a.lookup_claim(hs[:6]) == ([], 0)
    assert b.lookup_claim(hs) == ([], 6)  # and b claims the last two
    (slot,) = a.lease(1)
    a.commit([(*slot, hs[0])])
    hits, pending = b.lookup_claim(hs)
    assert [h.hash for h in hits] == hs[:1] and pending == 5
    a.release([hs[0]], unclaim=hs[1:3])  # a gives two up: they become b's
    hits, pending = b.lookup_claim(hs[1:])
    assert hits == [] and pending == 0
    assert a.lookup_claim(hs[1:], claim=False) == ([], 2)  # b's claims come first now
    assert agent.stats()["claimed_blocks"] == 7
    with pytest.raises(AgentError, match="every hash must be 16 bytes"):
        b.release([], unclaim=[b"short"])  # refused whole: b's claims stay
    b.close()
    deadline = time.monotonic() + 5
    while agent.stats()["claimed_blocks"] != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.lookup_claim(hs[1:], claim=False) == ([], 0)  # only a's own claims are left
    a.close()


def test_bad_requests_get_clear_errors_and_hurt_no_one(agent: AgentProc) -> None:
    c = AgentClient(agent.socket, "tok-chat", 4096, Budget(max_blocks=4)).connect()
    with pytest.raises(AgentError, match="every hash must be 16 bytes"):
        c.lookup([b"short"])
    with pytest.raises(AgentError, match="unknown op 'explode'"):
        c.call({"op": "explode"})
    with pytest.raises(AgentError, match="not leased by this session"):
        c.release([], [(0, 0)])
    with pytest.raises(AgentError, match="not pinned by this session"):
        c.release([b"\x01" * 16])
    with pytest.raises(AgentFull, match="exceed its max of 4"):
        c.lease(5)
    assert len(c.lease(4)) == 4  # nothing leaked by the refused requests
    # an oversized frame ends that connection only
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent.socket)
    s.sendall(HEADER.pack(1 << 30))
    assert b"limit" in s.recv(4096)
    s.close()
    assert c.ping() == agent.stats()["boot_id"]
    c.close()


def test_a_reply_longer_than_one_read_arrives_whole(agent: AgentProc) -> None:
    c = AgentClient(agent.socket, "tok-chat", 4096).connect()
    tags = [bytes([i % 251]) for i in range(60_000)]  # a reply of two 60,000-long lists
    assert 2 * len(tags) > RECV_BYTES  # of a byte an item: more than one recv() takes
    assert c.count(tags) == [(0, 0)] * len(tags)
    assert c.ping() == agent.stats()["boot_id"]  # the stream is still in step
    c.close()


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.text(max_size=5),
    st.binary(min_size=16, max_size=16),
    st.lists(st.binary(max_size=20), max_size=3),
    st.lists(
        st.lists(st.one_of(st.integers(-2, 70), st.binary(max_size=17)), max_size=4), max_size=3
    ),
    st.dictionaries(st.text(max_size=10), st.integers(-3, 3), max_size=3),
)
_ops = st.sampled_from(["lease", "commit", "lookup", "release", "stats", "ping", "bogus", ""])
_requests = st.one_of(
    st.binary(max_size=64),  # not msgpack, or msgpack of anything
    st.fixed_dictionaries(
        {"op": st.one_of(_ops, _values)},
        optional={k: _values for k in ("n", "hashes", "items", "slots", "claim", "unclaim")},
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=_requests)
def test_fuzzed_requests_never_break_the_agent(agent: AgentProc, payload: object) -> None:
    c = AgentClient(agent.socket, "tok-chat", 4096).connect()
    try:
        assert c._sock is not None
        body = payload if isinstance(payload, bytes) else encode_frame(payload)[HEADER.size :]
        c._sock.sendall(HEADER.pack(len(body)) + body)
        c._sock.settimeout(5)
        dec = FrameDecoder()
        data = c._sock.recv(65536)
        if data:
            dec.feed(data)
            reply = next(iter(dec.frames()))
            assert isinstance(reply, dict) and "ok" in reply
    except (ConnectionError, StopIteration, OSError):
        pass
    finally:
        c.close()
    fresh = AgentClient(agent.socket, "tok-chat", 4096).connect()
    assert fresh.ping()
    fresh.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hello=st.fixed_dictionaries(
        {"op": st.sampled_from(["register", "lease"])},
        optional={
            "token": st.one_of(st.sampled_from(["tok-chat", "tok-forged"]), _values),
            "block_bytes": _values,
            "budget": st.one_of(
                _values,
                st.fixed_dictionaries(
                    {}, optional={k: _values for k in ("min_blocks", "max_blocks", "priority")}
                ),
            ),
        },
    )
)
def test_fuzzed_registrations_get_a_reply_and_no_memory_unless_valid(
    agent: AgentProc, hello: dict[str, object]
) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(agent.socket)
    try:
        s.sendall(encode_frame(hello))
        data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(16))
        dec = FrameDecoder()
        dec.feed(data)
        reply = next(iter(dec.frames()))
        fds = [
            int.from_bytes(d[i : i + 4], "little") for _, _, d in anc for i in range(0, len(d), 4)
        ]
        for fd in fds:
            os.close(fd)
        if reply["ok"]:  # only a known token with a usable block size gets a region
            assert hello.get("token") == "tok-chat" and len(fds) == 1
        else:
            assert fds == [] and reply["error"]
    finally:
        s.close()
    fresh = AgentClient(agent.socket, "tok-chat", 4096).connect()
    assert fresh.ping()
    fresh.close()


def test_restarted_agent_has_a_new_boot_and_clients_re_register(tmp_path: Path) -> None:
    with agent_process(tmp_path) as a:
        c = AgentClient(a.socket, "tok-chat", 4096).connect()
        boot1 = c.ping()
        slots = c.lease(1)
        c.commit([(slots[0][0], slots[0][1], b"\x07" * 16)])
    with agent_process(tmp_path) as b:
        with pytest.raises(AgentUnavailable):
            c.ping()
        c2 = AgentClient(b.socket, "tok-chat", 4096).connect()
        assert c2.ping() != boot1
        assert c2.lookup([b"\x07" * 16]) == []  # a new boot starts empty
        c2.close()


async def test_event_stream_snapshot_then_live(agent: AgentProc) -> None:
    writer = run_writer(agent, "tok-chat", 2, "exit")
    writer.wait(10)
    records = []
    async with aiohttp.ClientSession() as s, s.get(agent.url + "/v1/events") as resp:
        dec = FrameDecoder()

        async def read_until(n: int) -> None:
            while len(records) < n:
                chunk = await resp.content.readany()
                dec.feed(chunk)
                records.extend(from_wire(f) for f in dec.frames())

        await asyncio.wait_for(read_until(1), 10)
        snap = records[0]
        assert snap.blocks == {b"\x01" * 16: "device", b"\x02" * 16: "device"}  # type: ignore[union-attr]
        w2 = await asyncio.to_thread(run_writer, agent, "tok-chat", 3, "exit")
        await asyncio.to_thread(w2.wait, 10)
        await asyncio.wait_for(read_until(2), 10)
        live = records[1]
        assert live.type == "stored" and live.seq == snap.seq + 1  # type: ignore[union-attr]
    # SIGTERM: the agent publishes 'cleared' and exits cleanly
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    assert not await asyncio.to_thread(os.path.exists, agent.socket)


def test_metrics_and_stats(agent: AgentProc) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    c = AgentClient(agent.socket, "tok-chat", 4096).connect()
    (slot,) = c.lease(1)
    c.commit([(slot[0], slot[1], b"\x01" * 16)])
    c.lease(2)  # held, not committed
    assert len(c.lookup([b"\x01" * 16, b"\x02" * 16])) == 1  # 1 hit, 1 miss
    text = urllib.request.urlopen(agent.url + "/metrics").read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("kvmarina_agent_hit_tokens_total", ())] == 16  # block_size tokens per block
    assert samples[("kvmarina_agent_miss_tokens_total", ())] == 16
    assert (
        samples[("kvmarina_agent_serving_leased", (("namespace", "team-a"), ("serving", "chat")))]
        == 2
    )
    assert (
        samples[("kvmarina_agent_serving_blocks", (("namespace", "team-a"), ("serving", "chat")))]
        == 3
    )
    assert samples[("kvmarina_agent_blocks", (("tier", "device"),))] == 1
    c.close()
    for name in (
        "kvmarina_agent_pages",
        "kvmarina_agent_blocks",
        "kvmarina_agent_lookups_total",
        "kvmarina_agent_evictions_total",
        "kvmarina_agent_event_seq",
        "kvmarina_agent_hit_tokens_total",
        "kvmarina_agent_miss_tokens_total",
        "kvmarina_agent_subscribers",
        "kvmarina_agent_sessions",
    ):
        assert name in text
    assert agent.stats()["node"] == "node-a"


def test_a_serving_added_after_start_can_register(agent: AgentProc) -> None:
    import json

    creds = Path(json.loads(agent.config.read_text())["credentials_file"])
    doc = json.loads(creds.read_text())
    with pytest.raises(AgentError, match="unknown credential"):
        AgentClient(agent.socket, "tok-new", 4096).connect()
    doc["servings"].append({"name": "new", "namespace": "team-c", "token": "tok-new"})
    creds.write_text(json.dumps(doc))
    c = AgentClient(agent.socket, "tok-new", 4096).connect()
    assert c.info["scope"] == "ns/team-c"
    c.close()


def test_admin_clear_drops_unpinned_blocks_from_loopback_only(agent: AgentProc) -> None:
    import http.client
    import json
    from urllib.parse import urlparse

    run_writer(agent, "tok-chat", 2, "exit").wait(10)
    port = urlparse(agent.url).port

    def clear(source: str) -> tuple[int, dict[str, object]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
        conn.request("POST", "/admin/clear")
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    assert clear("127.0.0.2")[0] == 403  # another address: refused, nothing dropped
    assert agent.stats()["blocks"]["device"] == 2  # type: ignore[index]
    assert clear("127.0.0.1") == (200, {"dropped": 2})
    assert agent.stats()["blocks"]["device"] == 0  # type: ignore[index]


@pytest.mark.parametrize("level", ["info", "warning"])
def test_the_pools_agent_log_level_reaches_the_agent(tmp_path: Path, level: str) -> None:
    """spec.agent.logLevel -> the planned DaemonSet's environment -> the agent's logs."""
    from kvmarina.operator.plan_pool import plan_pool
    from kvmarina.operator.settings import Settings
    from kvmarina.validate import parse_resource

    doc = {"apiVersion": "kvmarina.io/v1alpha1", "kind": "KVCachePool",
           "metadata": {"name": "p"}, "spec": {"agent": {"logLevel": level}}}  # fmt: skip
    plan = plan_pool(parse_resource(doc), "u", Settings(), {"token": "t"})
    (ds,) = [m for m in plan if m["kind"] == "DaemonSet"]
    env = {e["name"]: e["value"] for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e and e["name"].startswith("KVMARINA_LOG")}  # fmt: skip
    assert env["KVMARINA_LOG_LEVEL"] == level
    with agent_process(tmp_path, env=env) as agent:
        pass
    out = agent.proc.stdout.read() if agent.proc.stdout else ""
    assert (" INFO kvmarina.agent" in out) == (level == "info"), out


async def test_an_engine_load_report_reaches_the_event_stream(agent: AgentProc) -> None:
    c = await asyncio.to_thread(AgentClient(agent.socket, "tok-chat", 4096, pod="engine-7").connect)
    async with aiohttp.ClientSession() as s, s.get(agent.url + "/v1/events") as resp:
        dec, records = FrameDecoder(), []
        while not records:
            dec.feed(await asyncio.wait_for(resp.content.readany(), 10))
            records.extend(from_wire(f) for f in dec.frames())
        assert isinstance(records[0], Snapshot)
        await asyncio.to_thread(c.report_load, 4, 1)
        while len(records) < 2:
            dec.feed(await asyncio.wait_for(resp.content.readany(), 10))
            records.extend(from_wire(f) for f in dec.frames())
        assert records[1] == LoadRecord("engine-7", running=4, waiting=1)
    c.close()
    with pytest.raises(AgentError, match="pod must be a name of at most 253 characters"):
        AgentClient(agent.socket, "tok-chat", 4096, pod="x" * 254).connect()
