"""HTTP reads of the components the operator created: agents' ``/stats``, engines' ``/metrics``.

The only module of the operator besides ``kube.py`` allowed an HTTP client; it never
talks to the Kubernetes API. Every read has a bounded timeout and a bounded number
in flight, and a failure is returned as a message, never raised: one unreachable
pod must not stop a reconcile or hide the others' figures.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp

DEFAULT_TIMEOUT_S = 2.0
MAX_IN_FLIGHT = 32
MAX_BODY = 4 * 2**20  # a /stats or /metrics answer larger than this is not one of ours


@dataclass(frozen=True, slots=True)
class Fetched:
    """One read: ``body`` (text) when the pod answered 200, else ``error`` says why."""

    url: str
    body: str | None = None
    error: str | None = None


@dataclass
class Scraper:
    """A pooled client for many short reads. Invariant: ``fetch_all`` returns one
    ``Fetched`` per URL, in the order given, whatever happens to each read."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_in_flight: int = MAX_IN_FLIGHT
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def fetch(self, url: str, gate: asyncio.Semaphore | None = None) -> Fetched:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        try:
            async with gate or contextlib.nullcontext(), self._session.get(url) as resp:
                body = await resp.content.read(MAX_BODY + 1)
                if resp.status != 200:
                    return Fetched(url, error=f"HTTP {resp.status}")
                if len(body) > MAX_BODY:
                    return Fetched(url, error=f"answer larger than {MAX_BODY} bytes")
                return Fetched(url, body=body.decode(errors="replace"))
        except TimeoutError:
            return Fetched(url, error=f"no answer within {self.timeout_s:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Fetched(url, error=f"{type(exc).__name__}: {exc}"[:200])

    async def fetch_all(self, urls: list[str]) -> list[Fetched]:
        gate = asyncio.Semaphore(self.max_in_flight)
        return list(await asyncio.gather(*(self.fetch(u, gate) for u in urls)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
