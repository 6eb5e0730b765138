"""The part of HTTP/1.1 the router's front (``router.front``) speaks itself: the head of
a plain POST to an OpenAI endpoint, and the heads of its answers.

``parse_head`` is deliberately narrow. It accepts only what it understands completely
(HTTP/1.1, a known path, a ``Content-Length`` body, well-formed token names) and says
``None`` to anything else: chunked or encoded bodies, ``Expect``, upgrades, odd
whitespace, duplicated lengths. The front hands such a connection to aiohttp, whose
parser gives the answer a full server would, so nothing unusual is half-handled here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

from multidict import CIMultiDict

from kvmarina.router.requests import ENDPOINTS

#: request target -> (request kind, the engine's path)
FAST_PATHS = {path.encode(): (kind, path) for path, kind in ENDPOINTS.items()}
#: header lines, each ``token ":" value CRLF`` (a value of visible bytes, spaces, tabs)
_HEADERS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
#: headers whose presence means the request is not a plain one (aiohttp takes it)
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"})
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(frozen=True, slots=True)
class RequestHead:
    kind: str
    path: str
    headers: CIMultiDict[str]
    length: int
    keep_alive: bool


def parse_head(raw: bytes) -> RequestHead | None:
    """The head (up to, not including, its blank line) of a plain POST to an OpenAI
    endpoint; ``None`` for any other request."""
    line, sep, rest = raw.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    target = FAST_PATHS.get(parts[1])
    if target is None:
        return None
    if sep and _HEADERS.fullmatch(rest + b"\r\n") is None:
        return None  # every line well-formed, checked at once
    pairs = []
    for line in rest.split(b"\r\n") if sep else ():
        name, _, value = line.partition(b":")
        pairs.append((name, value.strip(b" \t")))
    length = -1
    keep_alive = True
    for name, value in pairs:
        lname = name.lower()
        if lname == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif lname in _NOT_PLAIN:
            return None
        elif lname == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            keep_alive = b"close" not in tokens
    if length < 0:
        return None
    # aiohttp's reading of header bytes, so both paths see the same strings
    headers = CIMultiDict(
        [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in pairs]
    )
    return RequestHead(target[0], target[1], headers, length, keep_alive)


class _Clock:
    """The ``Date`` header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode()
        return self._value


_clock = _Clock()


def response_head(
    status: int,
    content_type: str,
    headers: Mapping[str, str] | None,
    *,
    length: int | None,
    close: bool,
) -> bytes:
    """A response's head; ``length`` ``None`` is a chunked body."""
    out = [
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nDate: %s\r\n"
        % (status, _REASONS.get(status, b"Unknown"), content_type.encode("latin-1"), _clock.now())
    ]
    if length is None:
        out.append(b"Transfer-Encoding: chunked\r\n")
    else:
        out.append(b"Content-Length: %d\r\n" % length)
    if close:
        out.append(b"Connection: close\r\n")
    if headers:
        for k, v in headers.items():
            if "\r" in v or "\n" in v:
                raise ValueError(f"header {k!r} has a line break in its value")
            out.append(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")))
    out.append(b"\r\n")
    return b"".join(out)
