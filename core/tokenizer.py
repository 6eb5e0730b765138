"""Text -> token ids, behind one small interface shared by router and engine.

Both the router and the engine must hash the same token ids, so both obtain
their tokenizer here. ``ByteTokenizer`` needs no files: each UTF-8 byte is one
token (ids 0..255) and a few special ids follow. Real tokenizers (Hugging Face
``tokenizer.json``) plug in behind the same ``Tokenizer`` protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


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


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF  # light, but only needed here

        self.path = Path(path)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as exc:  # the library raises its own exception types
            raise TokenizerError(f"cannot load {self.path}: {exc}") from exc
        self.name = f"hf:{self.path.parent.name}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = _special_ids(self.path.parent, self._tok)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))


class TokenizerError(ValueError):
    pass


def _special_ids(folder: Path, tok: Any) -> tuple[int | None, int | None]:
    """BOS/EOS ids from ``tokenizer_config.json`` when present, else common names."""
    names: dict[str, Any] = {}
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            names = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{cfg} is not valid JSON: {exc}") from exc

    def token_id(key: str, fallbacks: tuple[str, ...]) -> int | None:
        value = names.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        for cand in ((value,) if value else ()) + fallbacks:
            tid = tok.token_to_id(cand)
            if tid is not None:
                return int(tid)
        return None

    return (
        token_id("bos_token", ("<s>", "<|begin_of_text|>")),
        token_id("eos_token", ("</s>", "<|end_of_text|>", "<|endoftext|>")),
    )


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    """The tokenizer of a model directory (``tokenizer.json``), else byte-level.

    Router and engine both call this with the same directory, so they produce
    the same token ids and therefore the same block hashes.
    """
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file():
            return HFTokenizer(path)
    return ByteTokenizer()
