from __future__ import annotations

import pytest

from kvmarina.chat import ChatError, render_chat
from kvmarina.events import BlockEvent, EventError, Resync, Snapshot, from_wire
from kvmarina.framing import FrameDecoder, encode_frame
from kvmarina.tokenizer import ByteTokenizer, Tokenizer


def test_event_records_round_trip_through_frames() -> None:
    records = [
        Snapshot("boot-1", 7, "node-a", {b"\x01" * 16: "device", b"\x02" * 16: "host"}),
        BlockEvent("stored", "boot-1", 8, (b"\x03" * 16,), "device"),
        BlockEvent("moved", "boot-1", 9, (b"\x03" * 16,), "host"),
        BlockEvent("evicted", "boot-1", 10, (b"\x01" * 16,)),
        BlockEvent("cleared", "boot-1", 11),
        Resync("boot-1", "subscriber fell behind"),
    ]
    dec = FrameDecoder()
    dec.feed(b"".join(encode_frame(r.to_wire()) for r in records))
    assert [from_wire(f) for f in dec.frames()] == records


@pytest.mark.parametrize(
    "rec",
    [
        {"seq": 1},
        {"type": "stored", "boot_id": "b", "seq": 1},
        {"type": "exploded", "boot_id": "b", "seq": 1},
        {"type": "evicted", "boot_id": "b"},
        [1, 2],
    ],
)
def test_malformed_event_records(rec: object) -> None:
    with pytest.raises(EventError):
        from_wire(rec)


def test_chat_template_is_stable_and_shares_prefixes() -> None:
    sys_msg = {"role": "system", "content": "You are terse."}
    a = render_chat([sys_msg, {"role": "user", "content": "hi"}])
    b = render_chat([sys_msg, {"role": "user", "content": "bye"}])
    assert a.startswith("<|system|>\nYou are terse.\n<|user|>\n")
    assert a.endswith("<|assistant|>\n")
    common = len("<|system|>\nYou are terse.\n<|user|>\n")
    assert a[:common] == b[:common]
    parts = render_chat(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}],
            }
        ]
    )
    assert "xy" in parts


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": 5}], "content must be"),
        (["hi"], "must be an object"),
    ],
)
def test_chat_errors(messages: list[object], match: str) -> None:
    with pytest.raises(ChatError, match=match):
        render_chat(messages)  # type: ignore[arg-type]


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    ids = tok.encode("héllo", add_bos=True)
    assert ids[0] == 256 and max(ids[1:]) < 256
    assert tok.decode(ids) == "héllo"
