"""Text -> token ids, behind one small interface shared by router and engine.

Both the router and the engine must hash the same token ids, so both obtain
their tokenizer here. ``ByteTokenizer`` needs no files: each UTF-8 byte is one
token (ids 0..255) and a few special ids follow. Real tokenizers (Hugging Face
``tokenizer.json``) plug in behind the same ``Tokenizer`` protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers. ``encode`` must be deterministic."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is BOS, 257 is EOS."""

    name = "bytes"
    vocab_size = 258
    bos_id: int | None = 256
    eos_id: int | None = 257

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, 256)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        data = bytes(t for t in token_ids if 0 <= t < 256)
        return data.decode("utf-8", errors="replace")
