"""The size presets: seeded random Llama models that need no download (tests, demos).

A preset is a Hugging Face ``config.json`` document (the one source of its shape: the
reference engine builds its model from it, ``kvmarina.layout`` names its KV layout
from it) and a byte-level vocabulary: ids 0..255 are the UTF-8 bytes, 256 is BOS
(``<s>``), 257 is EOS (``</s>``), as ``kvmarina.tokenizer.ByteTokenizer`` numbers them.

Engines that load only model folders (vLLM) get a preset as a folder:
``write_preset_folder`` writes its ``config.json``, a ``tokenizer.json`` of that byte
vocabulary (adding BOS to a completion prompt, as Llama's does) and a chat template;
the reference engine writes the seeded weights beside them (``kvmarina model export``).
A router needs only the tokenizer and ``config.json``, so it writes the folder without
weights and without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 258,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}

# Sizes chosen to run on a laptop-class CPU: ``tiny`` for tests, ``small`` for the demo
# and benchmarks (enough compute that prefix reuse is measurable; and a head dimension
# of 32, the smallest vLLM's CPU attention accepts).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {**_BASE, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {**_BASE, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2},
}  # fmt: skip

BOS, EOS = "<s>", "</s>"
#: kvmarina's chat format (``kvmarina.chat``) as a Hugging Face chat template, after BOS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class PresetError(ValueError):
    """An unknown preset name."""


def preset_config(preset: str, dtype: str = "float32") -> dict[str, Any]:
    try:
        return {**PRESET_CONFIGS[preset], "torch_dtype": dtype}
    except KeyError:
        known = ", ".join(PRESET_CONFIGS)
        raise PresetError(f"unknown preset {preset!r}; known: {known}") from None


def write_preset_folder(preset: str, dtype: str, out: str | Path) -> Path:
    """``config.json``, tokenizer and chat template of ``preset`` in ``out`` (no weights)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(preset_config(preset, dtype), indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 256, "eos_token_id": 257})
    )
    (folder / "tokenizer.json").write_text(json.dumps(_byte_tokenizer()))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": PRESET_CONFIGS[preset]["max_position_embeddings"],
            },
            indent=2,
        )
    )
    return folder


def _byte_chars() -> list[str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def _byte_tokenizer() -> dict[str, Any]:
    """A ``tokenizers`` document: byte-level pre-tokenizer, one token per byte (no
    merges), BOS/EOS special, BOS prepended by the post-processor."""
    vocab = {ch: i for i, ch in enumerate(_byte_chars())} | {BOS: 256, EOS: 257}
    special = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in ((256, BOS), (257, EOS))
    ]  # fmt: skip
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}

    def seq(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, seq("A", 0)],
            "pair": [bos, seq("A", 0), seq("B", 1)],
            "special_tokens": {BOS: {"id": BOS, "ids": [256], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
