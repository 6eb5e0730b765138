"""Model configuration: Hugging Face ``config.json`` (Llama family) or a size preset.

The presets exist so that tests and the demo run anywhere without weights: a
preset plus a seed gives the same random model in every process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvmarina.layout import KVLayout, ModelIdentity
from kvmarina.presets import PRESET_CONFIGS


class ModelConfigError(ValueError):
    """A model configuration that cannot be loaded or makes no sense."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-family decoder.

    Invariants: ``hidden_size == num_heads * head_dim``; ``num_heads`` is a
    multiple of ``num_kv_heads`` (grouped-query attention).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position",
        ):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_layout(self, block_size: int) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, block_size)

    def identity(self, name: str, revision: str, block_size: int) -> ModelIdentity:
        return ModelIdentity(name, self.kv_layout(block_size), revision)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` a Hugging Face Llama checkpoint of this shape carries."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
        }

    @classmethod
    def from_hf(cls, data: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        model_type = data.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ModelConfigError(
                f"model_type {model_type!r} is not a Llama-family decoder this engine runs "
                "(llama, mistral, qwen2)"
            )
        try:
            heads = int(data["num_attention_heads"])
            return cls(
                vocab_size=int(data["vocab_size"]),
                hidden_size=int(data["hidden_size"]),
                intermediate_size=int(data["intermediate_size"]),
                num_layers=int(data["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(data.get("num_key_value_heads", heads)),
                max_position=int(data.get("max_position_embeddings", 4096)),
                rope_theta=float(data.get("rope_theta", 10000.0)),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                dtype=dtype or _hf_dtype(data.get("torch_dtype")),
            )
        except KeyError as exc:
            raise ModelConfigError(f"config.json is missing {exc.args[0]!r}") from exc

    def with_dtype(self, dtype: str) -> ModelConfig:
        return replace(self, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _hf_dtype(value: Any) -> str:
    if value in ("float16", "bfloat16", "float32"):
        return str(value)
    return "float32"


# The presets' shapes are core's (``kvmarina.presets``): one document per preset, from
# which this engine builds its model and vLLM reads the exported folder.
PRESETS: dict[str, ModelConfig] = {
    name: ModelConfig.from_hf(doc) for name, doc in PRESET_CONFIGS.items()
}


def preset(name: str, dtype: str = "float32") -> ModelConfig:
    try:
        return PRESETS[name].with_dtype(dtype)
    except KeyError:
        raise ModelConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}") from None


def load_config(model_dir: str | Path, dtype: str | None = None) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(
            f"{path} not found: a model directory needs a Hugging Face config.json "
            "(or use a preset: tiny, small)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc
    return ModelConfig.from_hf(data, dtype)
