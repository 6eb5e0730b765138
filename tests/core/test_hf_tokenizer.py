"""A real Hugging Face tokenizer.json (trained here) behind the core interface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvmarina.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer


def _train(folder: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the cache is shared by every pod on the node"] * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )


def test_loads_tokenizer_json_and_round_trips(tmp_path: Path) -> None:
    _train(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the cache is shared", add_bos=True)
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(ids) == "the cache is shared"
    assert tok.encode("the cache") == load_tokenizer(tmp_path).encode("the cache")


def test_falls_back_to_bytes_and_explains_bad_files(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("special", [False, True])
def test_the_fast_path_gives_the_ids_of_a_full_encode(tmp_path: Path, special: bool) -> None:
    """``encode`` skips the offsets (``encode_batch_fast``); the ids must be what the
    library's full ``encode`` gives, special tokens, odd bytes and all, or the router's
    block hashes would stop matching the engine's."""
    _train(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok._fast is not None
    full = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["", " ", "the cache<s> is </s>shared", "héllo ✓ 日本\n\ttabs  ", "pod " * 500]
    for text in texts:
        want = full.encode(text, add_special_tokens=special).ids
        assert tok.encode(text, add_special_tokens=special) == want
    tok._fast = None  # a tokenizers release without the fast path: the full encode
    assert tok.encode("the cache is shared") == full.encode("the cache is shared").ids
