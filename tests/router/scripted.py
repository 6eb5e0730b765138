"""Pods scripted byte by byte on loopback, for tests of what the router does with
every kind of answer (``ScriptedPods``), and a router in front of them (``routed``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from kvmarina.load_report import LOAD_HEADER
from kvmarina.router.pods import PodState
from kvmarina.router.server import Router

from .conftest import Fleet, router_doc

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
WHOLE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"{LOAD_HEADER}: running=3;waiting=1;queued=7\r\n".encode()
    + b"Content-Length: 2\r\n\r\n{}"
)
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
HELLO = b"5\r\nhello\r\n"
END = b"0\r\n\r\n"

#: one answer: parts written in turn (an Event is waited for), then whether to close;
#: ``None``: never answer (wait until the router gives up and closes the connection)
Answer = tuple[list[bytes | asyncio.Event], bool] | None


class ScriptedPods:
    """Pods on loopback that answer the requests they get, whichever pod gets one,
    with the next of ``answers`` (so the test need not know the decision's order)."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.servers: list[asyncio.Server] = []
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self, n: int) -> list[dict[str, str]]:
        pods = []
        for i in range(n):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.servers.append(server)
            port = server.sockets[0].getsockname()[1]
            pods.append({"name": f"p{i}", "url": f"http://127.0.0.1:{port}", "node": f"n{i}"})
        return pods

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while await self._answer(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Reads one request and answers it; ``False`` once the connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        answer = self.answers.pop(0)
        if answer is None:
            await reader.read()  # until the router closes the connection
            return False
        parts, close = answer
        for part in parts:
            if isinstance(part, asyncio.Event):
                await part.wait()
            else:
                writer.write(part)
                await writer.drain()
        return not close

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self.handlers):
            t.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)


def doc(pods: list[dict[str, str]], **limits: Any) -> dict[str, Any]:
    # no health or load polls: every request a scripted pod sees is the router's forward
    limits = {"health_interval_s": 0, "load_interval_s": 0, **limits}
    return router_doc(pods, routing={"policy": "round-robin"}, limits=limits)


def books(pod: PodState) -> tuple[int, int, int]:
    return pod.inflight, pod.queued_tokens, pod.decoding


async def post(url: str, stream: bool = False) -> tuple[int, bytes]:
    """Status and whatever body arrived (a truncated stream ends the read early)."""
    body = {"model": "sim", "prompt": "x" * 64, "max_tokens": 2, "stream": stream}
    got = b""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/completions", json=body) as r,
    ):
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for data in r.content.iter_any():
                got += data
        return r.status, got


async def routed(
    fleet: Fleet, scripted: list[ScriptedPods], answers: list[Answer], n: int = 1, **limits: Any
) -> tuple[Router, str]:
    pods = ScriptedPods(answers)
    scripted.append(pods)
    return await fleet.router(doc(await pods.start(n), **limits))
