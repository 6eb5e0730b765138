from __future__ import annotations

import asyncio
import socket

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmarina.framing import (
    HEADER,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    MalformedFrame,
    decode_body,
    encode_frame,
    read_frame,
    write_frame,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None)
@given(msgs=st.lists(values, min_size=1, max_size=5), chunk=st.integers(1, 17))
def test_incremental_decoder_round_trip(msgs: list[object], chunk: int) -> None:
    wire = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    out: list[object] = []
    for i in range(0, len(wire), chunk):
        dec.feed(wire[i : i + chunk])
        out.extend(dec.frames())
    assert out == msgs
    assert dec.pending == 0


def test_size_limit_is_enforced_before_buffering() -> None:
    with pytest.raises(FrameTooLarge, match="exceeds the limit"):
        encode_frame(b"x" * 100, max_size=50)
    dec = FrameDecoder(max_size=1024)
    dec.feed(HEADER.pack(10**9))
    with pytest.raises(FrameTooLarge, match="announced a frame of 1000000000 bytes"):
        list(dec.frames())


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\x92\x01", msgpack.packb({1: 2}), msgpack.packb(msgpack.ExtType(5, b"x"))],
)
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_body(body)


def test_unencodable_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="cannot encode"):
        encode_frame(object())


async def test_async_read_write_over_a_real_socket() -> None:
    a, b = socket.socketpair()
    try:
        _r1, w1 = await asyncio.open_connection(sock=a)
        r2, w2 = await asyncio.open_connection(sock=b)
        await write_frame(w1, {"op": "ping", "hashes": [b"\x00" * 16]})
        assert await read_frame(r2) == {"op": "ping", "hashes": [b"\x00" * 16]}
        w1.write(HEADER.pack(10) + b"abc")
        await w1.drain()
        w1.close()
        with pytest.raises(MalformedFrame, match="3 of 10 body bytes"):
            await read_frame(r2)
        w2.close()
    finally:
        a.close()
        b.close()


async def test_clean_close_is_eof() -> None:
    a, b = socket.socketpair()
    r2, w2 = await asyncio.open_connection(sock=b)
    a.close()
    with pytest.raises(EOFError):
        await read_frame(r2)
    w2.close()
