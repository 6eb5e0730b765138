"""Weights: load a Hugging Face Llama directory, or build a seeded random model.

A model directory holds ``config.json`` and one or more ``*.safetensors``
files (sharded checkpoints list their shards in ``model.safetensors.index.json``;
every shard in the folder is read, so the index is not needed). Nothing is ever
downloaded: a missing directory is an error that says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvmarina.engine.config import ModelConfig, ModelConfigError, load_config, preset
from kvmarina.engine.model import DTYPES, LlamaForCausalLM, build_model
from kvmarina.presets import write_preset_folder

log = logging.getLogger(__name__)

# Checkpoint keys that carry no weights we need (rotary caches of older exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A checkpoint that does not fit the model it claims to be."""


def load_model(
    model_dir: str | Path | None, preset_name: str | None, dtype: str, seed: int = 0
) -> LlamaForCausalLM:
    """The model to serve: from a directory when given, else from a preset."""
    if model_dir is not None:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelConfigError(f"model directory {folder} does not exist")
        cfg = load_config(folder, dtype)
        model = build_model(cfg, seed=None)
        load_weights(model, folder)
        return model
    if preset_name is None:
        raise ModelConfigError("give a model directory or a preset (tiny, small)")
    return build_model(preset(preset_name, dtype), seed=seed)


def load_weights(model: LlamaForCausalLM, folder: Path) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"no *.safetensors files in {folder}")
    expected = dict(model.state_dict())
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    dtype = DTYPES[model.config.dtype]
    for shard in shards:
        for key, tensor in load_file(str(shard)).items():
            if key.endswith(_IGNORED_SUFFIXES):
                continue
            if key not in expected:
                raise WeightsError(
                    f"{shard.name}: unexpected tensor {key!r}; is this a Llama-family checkpoint?"
                )
            target = expected[key]
            if tuple(tensor.shape) != tuple(target.shape):
                raise WeightsError(
                    f"{shard.name}: {key} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor.to(dtype))
            loaded.add(key)
    missing = set(expected) - loaded
    if tied:
        missing.discard("lm_head.weight")
    if missing:
        raise WeightsError(
            f"checkpoint in {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )
    log.info("loaded %d tensors from %d shard(s) in %s", len(loaded), len(shards), folder)


def save_checkpoint(model: LlamaForCausalLM, folder: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the Hugging Face layout."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    save_weights(model, out)
    return out


def save_weights(model: LlamaForCausalLM, folder: Path) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def export_preset(name: str, dtype: str, folder: str | Path, seed: int = 0) -> Path:
    """A preset's seeded weights as a Hugging Face folder (``kvmarina.presets`` writes
    its config, tokenizer and chat template): the same model the engine builds from
    ``--preset``, for engines that load only folders (vLLM)."""
    out = write_preset_folder(name, dtype, folder)
    save_weights(build_model(preset(name, dtype), seed=seed), out)
    # safetensors writes 0600: engines of other users (a pod's init container and its
    # engine need not share one) must read the weights
    (out / "model.safetensors").chmod(0o644)
    return out
