"""Presets as Hugging Face folders: the same shapes, identity, tokens and weights as the
reference engine's presets (what vLLM loads in local mode and in the vLLM tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmarina.layout import LayoutError, folder_identity, preset_identity
from kvmarina.presets import PRESET_CONFIGS, PresetError, write_preset_folder
from kvmarina.tokenizer import ByteTokenizer, load_tokenizer


@pytest.mark.parametrize("preset", sorted(PRESET_CONFIGS))
def test_a_preset_folder_names_the_presets_identity_and_byte_tokens(
    preset: str, tmp_path: Path
) -> None:
    folder = write_preset_folder(preset, "bfloat16", tmp_path)
    assert folder_identity(folder, "m", "main", "bfloat16", 32) == preset_identity(
        preset, "m", "main", "bfloat16", 32
    )
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tok, raw = load_tokenizer(folder), ByteTokenizer()
    for text in ("plain", "ünïcode and 日本語", " leading space", "tabs\tand\nlines"):
        assert tok.encode(text) == raw.encode(text)
        assert tok.decode(tok.encode(text, add_special_tokens=True)) == text


def test_export_cli_writes_weights_the_engine_loads_as_the_preset(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kvmarina.engine.weights import load_model

    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "kvmarina.cli", "model", "export", "--preset", "tiny"]
    res = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    from_folder = load_model(out, None, "float32").state_dict()
    from_preset = load_model(None, "tiny", "float32").state_dict()
    assert from_folder.keys() == from_preset.keys()
    assert all(torch.equal(from_folder[k], from_preset[k]) for k in from_preset)
    bad = subprocess.run([*cmd[:-2], "--preset", "huge", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown preset 'huge'; known: tiny, small" in bad.stderr
    light = tmp_path / "light"  # the router's copy: tokenizer and config only
    res = subprocess.run(
        [*cmd, "--out", str(light), "--no-weights"], capture_output=True, timeout=60
    )
    assert res.returncode == 0 and not (light / "model.safetensors").exists()


def test_folder_identity_explains_a_broken_config(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="cannot read"):
        folder_identity(tmp_path, "m", "main", "float16", 16)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(LayoutError, match="missing 'num_attention_heads'"):
        folder_identity(tmp_path, "m", "main", "float16", 16)
    with pytest.raises(PresetError):
        write_preset_folder("huge", "float16", tmp_path)
