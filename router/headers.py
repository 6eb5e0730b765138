"""What the router does with a client's headers before it forwards a request: the
contract's own headers (``kvmarina.headers``) are the router's to set, hop-by-hop ones
go, and values keep their bytes."""

from __future__ import annotations

from kvmarina.headers import PULL_HEADER, SALT_HEADER

#: Headers a client may never pass through to an engine (hop-by-hop ones included).
STRIPPED_HEADERS = frozenset(
    {
        SALT_HEADER,
        PULL_HEADER,
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "accept-encoding",  # bodies pass through untouched: ask pods for identity encoding
        "expect",
    }
)


def raw_value(value: str) -> str:
    """A received header value as the str whose Latin-1 encoding is its original bytes.
    aiohttp reads header bytes as UTF-8 (escaping what is not) but writes them as
    Latin-1, so a client's UTF-8 value would not survive the forward unconverted."""
    return value.encode("utf-8", "surrogateescape").decode("latin-1")
