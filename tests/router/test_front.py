"""The router's HTTP front over real sockets: the plain POSTs it serves itself, the
connections it hands to aiohttp (and what aiohttp then answers), pipelining, closing,
clients that leave or read slowly; and ``http1.parse_head`` case by case."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from kvmarina.router.http1 import parse_head, response_head

from .conftest import Fleet, router_doc
from .scripted import CHUNKED, END, HELLO, WHOLE, ScriptedPods, books, routed

BODY = json.dumps({"model": "sim", "prompt": "x" * 64, "max_tokens": 2}).encode()


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every front test on both loops: ``kvmarina router`` runs on uvloop where it is
    installed (its transports differ from asyncio's: the hand-off to aiohttp swaps
    the protocol of a uvloop transport)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


def plain(body: bytes = BODY, *, extra: bytes = b"", path: bytes = b"/v1/completions") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (path, extra, len(body), body)
    )


class Client:
    """One raw keep-alive connection: requests written as bytes, answers parsed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Client:
        host, port = url.rsplit("/", 1)[-1].split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body (de-chunked)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", ""):
            while size := int((await self.reader.readline()).strip(), 16):
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            await self.reader.readexactly(2)
        return status, headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


async def engines(fleet: Fleet, n: int = 2, **routing: Any) -> tuple[Any, str]:
    pods = []
    for i in range(n):
        _, url = await fleet.engine()
        pods.append({"name": f"p{i}", "url": url, "node": f"n{i}"})
    return await fleet.router(router_doc(pods, routing={"policy": "round-robin", **routing}))


async def test_one_connection_is_served_by_the_front_then_by_aiohttp(fleet: Fleet) -> None:
    """Plain POSTs are the front's; the first other request hands the connection to
    aiohttp for good, and every answer on it stays correct and in order."""
    router, url = await engines(fleet)
    c = await Client.open(url)
    c.writer.write(plain())
    status, headers, body = await c.answer()
    assert status == 200 and json.loads(body)["object"] == "text_completion"
    assert headers["content-type"] == "application/json" and "date" in headers
    c.writer.write(b"GET /metrics HTTP/1.1\r\nHost: r\r\n\r\n" + plain())
    status, headers, body = await c.answer()
    assert status == 200 and b"kvmarina_router_requests_total" in body
    status, headers, body = await c.answer()
    assert status == 200 and json.loads(body)["object"] == "text_completion"
    assert headers["server"].startswith("Python")  # aiohttp answers this connection now
    c.close()
    served = sum(p.served for p in router.core.pods.values())
    assert served == 2


async def test_pipelined_requests_are_answered_in_order(fleet: Fleet) -> None:
    _, url = await engines(fleet)
    c = await Client.open(url)
    prompts = [f"prompt number {i} " * 8 for i in range(5)]
    c.writer.write(
        b"".join(
            plain(json.dumps({"model": "sim", "prompt": p, "max_tokens": 1}).encode())
            for p in prompts
        )
    )
    for _ in prompts:
        status, _, body = await c.answer()
        assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] > 0
    c.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # a chunked upload: aiohttp reads it, the request path serves it
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY),
            200,
        ),
        (plain(extra=b"Expect: 100-continue\r\n"), 200),
        # over the body limit (set to 1 KiB below): the request path's 413
        (plain(json.dumps({"model": "sim", "prompt": "y" * 2000}).encode()), 413),
        (plain(path=b"/v1/embeddings"), 404),
        (b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: r\r\n\r\n", 200),
    ],
    ids=["chunked", "expect", "too-large", "unknown-path", "malformed", "models"],
)
async def test_what_the_front_does_not_serve_gets_aiohttps_answer(
    fleet: Fleet, request_bytes: bytes, status: int
) -> None:
    _, eng_url = await fleet.engine()
    pods = [{"name": "p0", "url": eng_url, "node": "n0"}]
    _, url = await fleet.router(router_doc(pods, limits={"max_body_bytes": 1024}))
    c = await Client.open(url)
    c.writer.write(request_bytes)
    if b"100-continue" in request_bytes:
        got, _, _ = await c.answer()
        assert got == 100
    got, _, body = await c.answer()
    assert got == status, body
    c.close()


async def test_connection_close_is_honoured(fleet: Fleet) -> None:
    _, url = await engines(fleet)
    c = await Client.open(url)
    c.writer.write(plain(extra=b"Connection: close\r\n"))
    status, headers, _ = await c.answer()
    assert status == 200 and headers["connection"] == "close"
    assert await c.closed()


async def test_a_client_that_half_closes_still_gets_its_answer(fleet: Fleet) -> None:
    _, url = await engines(fleet)
    c = await Client.open(url)
    c.writer.write(plain())
    c.writer.write_eof()
    status, _, _ = await c.answer()
    assert status == 200 and await c.closed()


async def test_a_client_that_leaves_mid_stream_settles_the_books(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    """The pod keeps streaming after the client left: the relay stops, the pod's load
    books go back to zero and its half-read connection is not reused."""
    gate = asyncio.Event()
    router, url = await routed(
        fleet, scripted, [([CHUNKED, HELLO, gate, HELLO, HELLO, END], False), ([WHOLE], False)]
    )
    c = await Client.open(url)
    body = json.dumps({"model": "sim", "prompt": "x" * 64, "stream": True}).encode()
    c.writer.write(plain(body))
    head = await c.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    c.writer.transport.abort()
    await asyncio.sleep(0.1)
    gate.set()
    pod = router.core.pods["p0"]
    for _ in range(100):
        if books(pod) == (0, 0, 0):
            break
        await asyncio.sleep(0.02)
    assert books(pod) == (0, 0, 0) and pod.failed == 0
    c = await Client.open(url)
    c.writer.write(plain())
    assert (await c.answer())[0] == 200
    assert len(scripted[0].handlers) == 1  # a fresh connection to the pod, the old closed
    c.close()


async def test_a_slow_reader_gets_a_long_stream_whole(
    fleet: Fleet, scripted: list[ScriptedPods]
) -> None:
    """A client that reads nothing for a while: the router's writes back up (its
    transport pauses it) and the stream still arrives complete, in order."""
    piece = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
    pieces = [piece] * 96  # 6 MiB: past the socket buffers and the transport's
    router, url = await routed(fleet, scripted, [([CHUNKED, *pieces, END], False)])
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c = Client(*await asyncio.open_connection(sock=sock))
    body = json.dumps({"model": "sim", "prompt": "x" * 64, "stream": True}).encode()
    c.writer.write(plain(body))
    await asyncio.sleep(0.5)
    conns = router_front_conns(router, fleet)
    status, _, got = await c.answer()
    assert status == 200 and got == b"z" * (65536 * 96)
    assert any(conn.pauses for conn in conns)
    c.close()


def router_front_conns(router: Any, fleet: Fleet) -> list[Any]:
    from kvmarina.router.front import Front

    fronts = [f for f in fleet.runners if isinstance(f, Front) and f.router is router]
    return [conn for f in fronts for conn in f.conns]


# -- parse_head -------------------------------------------------------------------------
def head_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def test_parse_head_takes_a_plain_post() -> None:
    h = parse_head(head_of(plain(extra=b"X-Tenant:  caf\xc3\xa9 \r\nconnection: Keep-Alive\r\n")))
    assert h is not None
    assert (h.kind, h.path, h.length, h.keep_alive) == (
        "completions",
        "/v1/completions",
        len(BODY),
        True,
    )
    assert h.headers["x-tenant"] == "café" and h.headers["CONTENT-TYPE"] == "application/json"
    chat = parse_head(head_of(plain(path=b"/v1/chat/completions")))
    assert chat is not None and chat.kind == "chat"
    closing = parse_head(head_of(plain(extra=b"Connection: close\r\n")))
    assert closing is not None and not closing.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/completions HTTP/1.1\r\nContent-Length: 0",
        b"POST /v1/completions HTTP/1.0\r\nContent-Length: 0",
        b"POST /v1/completions?x=1 HTTP/1.1\r\nContent-Length: 0",
        b"POST /v1/completions HTTP/1.1\r\nHost: r",  # no length
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: +2",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Encoding: gzip",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nConnection: Upgrade",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nX-A: 1\r\n folded",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length : 2",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nX-A: a\x00b",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\nX-A: 1",
        b"POST  /v1/completions HTTP/1.1\r\nContent-Length: 2",
    ],
)
def test_parse_head_refuses_anything_else(raw: bytes) -> None:
    assert parse_head(raw) is None


def test_response_head_refuses_a_line_break_in_a_value() -> None:
    assert response_head(200, "text/plain", None, length=0, close=False).startswith(
        b"HTTP/1.1 200 OK\r\n"
    )
    with pytest.raises(ValueError, match="line break"):
        response_head(200, "text/plain", {"X-A": "a\r\nb"}, length=0, close=False)
