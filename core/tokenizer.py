"""Text -> token ids, behind one small interface shared by router and engine.

Both the router and the engine must hash the same token ids, so both obtain
their tokenizer here. ``ByteTokenizer`` needs no files: each UTF-8 byte is one
token (ids 0..255) and a few special ids follow. Real tokenizers (Hugging Face
``tokenizer.json``) plug in behind the same ``Tokenizer`` protocol, with the
folder's chat template and special tokens (``tokenizer_config.json`` or
``chat_template.jinja``), so a router in front of vLLM renders chats as vLLM does.
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
    #: the model's chat template (Jinja), ``None`` for kvmarina's own chat format
    chat_template: str | None
    #: template variables naming special tokens (``bos_token``, ``eos_token``, ...)
    special_tokens: dict[str, str]

    def encode(
        self, text: str, *, add_bos: bool = False, add_special_tokens: bool = False
    ) -> list[int]:
        """``add_special_tokens``: what the tokenizer itself adds around a text, as a
        Hugging Face tokenizer does for a completion prompt (e.g. Llama's BOS)."""
        ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is BOS, 257 is EOS."""

    name = "bytes"
    vocab_size = 258
    bos_id: int | None = 256
    eos_id: int | None = 257
    chat_template: str | None = None

    def __init__(self) -> None:
        self.special_tokens: dict[str, str] = {}

    def encode(
        self, text: str, *, add_bos: bool = False, add_special_tokens: bool = False
    ) -> list[int]:
        # bytes have no post-processor: add_special_tokens adds nothing
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
        settings = _tokenizer_config(self.path.parent)
        self.bos_id, self.eos_id = _special_ids(settings, self._tok)
        self.special_tokens = _special_tokens(settings)
        self.chat_template = _chat_template(self.path.parent, settings)
        # the same ids without each token's character offsets, which nobody here reads
        # (tokenizers >= 0.21): half the time of ``encode`` on a 1,700-token prompt, the
        # router's largest cost a request for vLLM
        self._fast = getattr(self._tok, "encode_batch_fast", None)

    def encode(
        self, text: str, *, add_bos: bool = False, add_special_tokens: bool = False
    ) -> list[int]:
        if self._fast is not None:
            enc = self._fast([text], add_special_tokens=add_special_tokens)[0]
        else:
            enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        ids = list(enc.ids)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))


class TokenizerError(ValueError):
    pass


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{cfg} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{cfg} is not a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(names: dict[str, Any]) -> dict[str, str]:
    """The special-token variables a chat template sees (as Hugging Face passes them)."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(names.get(key))
        if text is not None:
            out[key] = text
    return out


def _chat_template(folder: Path, names: dict[str, Any]) -> str | None:
    """The folder's default chat template: ``chat_template.jinja`` (newer exports), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    value = names.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _special_ids(names: dict[str, Any], tok: Any) -> tuple[int | None, int | None]:
    """BOS/EOS ids from ``tokenizer_config.json`` when present, else common names."""

    def token_id(key: str, fallbacks: tuple[str, ...]) -> int | None:
        value = _token_text(names.get(key))
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
