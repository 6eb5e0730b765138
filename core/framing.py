"""The frame format of every kvmarina socket: a length prefix and a msgpack body.

    +----------------------+---------------------------+
    | length: uint32, BE   | body: msgpack, `length` B |
    +----------------------+---------------------------+

Why: msgpack carries bytes (block hashes, payload headers) natively and is
fast; the fixed prefix lets a reader reject an oversized frame before reading
it. Never pickle: a peer's bytes must not be able to run code here.

``decode_body`` refuses msgpack extension types and non-string map keys, so a
frame decodes to plain ``dict``/``list``/``str``/``bytes``/numbers only.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class FrameError(ValueError):
    """A frame that cannot be accepted; the message says why."""


class FrameTooLarge(FrameError):
    pass


class MalformedFrame(FrameError):
    pass


def _no_ext(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack extension type {code} is not allowed in kvmarina frames")


def encode_body(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot encode message: {exc}") from exc


def decode_body(body: bytes | memoryview, max_size: int = DEFAULT_MAX_FRAME) -> Any:
    # The frame length was checked against max_size before the body was read.
    check_length(len(body), max_size)
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
        )
    except FrameError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedFrame(f"malformed msgpack body: {exc}") from exc
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"malformed msgpack body: {exc}") from exc


def encode_frame(obj: Any, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    body = encode_body(obj)
    if len(body) > max_size:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the limit of {max_size} bytes")
    return HEADER.pack(len(body)) + body


def check_length(length: int, max_size: int) -> None:
    if length > max_size:
        raise FrameTooLarge(
            f"peer announced a frame of {length} bytes; the limit is {max_size} bytes"
        )


class FrameDecoder:
    """Incremental decoder for stream sockets: feed bytes, iterate complete frames.

    Invariant: ``_buf`` never holds a complete frame after ``frames()`` has been
    exhausted, and never grows beyond one header plus ``max_size`` bytes of body
    (an oversized announcement raises before the body is buffered).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> Iterator[Any]:
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            check_length(length, self.max_size)
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            body = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            yield decode_body(body, self.max_size)

    @property
    def pending(self) -> int:
        return len(self._buf)


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME) -> Any:
    """Read one frame; ``EOFError`` on a clean close between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError("connection closed") from exc
        raise MalformedFrame("connection closed inside a frame header") from exc
    (length,) = HEADER.unpack(header)
    check_length(length, max_size)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise MalformedFrame(
            f"connection closed after {len(exc.partial)} of {length} body bytes"
        ) from exc
    return decode_body(body, max_size)


async def write_frame(
    writer: asyncio.StreamWriter, obj: Any, max_size: int = DEFAULT_MAX_FRAME
) -> None:
    writer.write(encode_frame(obj, max_size))
    await writer.drain()
