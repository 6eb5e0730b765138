"""The KV layout of a model and the identity that makes KV blocks compatible.

The KV cache of one token is, for every layer, a K and a V vector per KV head::

    bytes_per_token = 2 (K and V) * num_layers * num_kv_heads * head_dim * itemsize
    bytes_per_block = bytes_per_token * block_size
    blocks_per_page = page_size // bytes_per_block      (a page holds whole blocks only)

Two processes may share a block only if everything that shapes those bytes is
equal: the model (name, revision), dtype, the layer/head layout and the tensor-
parallel slice. ``ModelIdentity.canonical()`` spells exactly that, and the
hashing contract seeds every chain with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kvmarina.presets import PRESET_CONFIGS

#: dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


class LayoutError(ValueError):
    """A KV layout that cannot exist (non-positive sizes, unknown dtype, page too small)."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of one model's KV cache on one tensor-parallel rank.

    Invariants: every count is >= 1 and ``dtype`` is a key of ``DTYPE_SIZES``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            allowed = ", ".join(DTYPE_SIZES)
            raise LayoutError(f"unknown dtype {self.dtype!r}; allowed: {allowed}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def bytes_per_block_per_layer(self) -> int:
        return self.bytes_per_block // self.num_layers

    def blocks_per_page(self, page_size: int) -> int:
        """Whole blocks that fit in one page; an error if not even one fits."""
        n = page_size // self.bytes_per_block
        if n < 1:
            raise LayoutError(
                f"a page of {page_size} bytes cannot hold one block of "
                f"{self.bytes_per_block} bytes ({self.describe()}); "
                "raise the pool's pageSize or lower the block size"
            )
        return n

    def pages_for_blocks(self, n_blocks: int, page_size: int) -> int:
        per_page = self.blocks_per_page(page_size)
        return -(-n_blocks // per_page)

    def describe(self) -> str:
        return (
            f"L{self.num_layers}/H{self.num_kv_heads}/D{self.head_dim}/"
            f"{self.dtype}/B{self.block_size}"
        )

    def to_dict(self) -> dict[str, int | str]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_size": self.block_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KVLayout:
        try:
            return cls(
                num_layers=int(data["num_layers"]),  # type: ignore[call-overload]
                num_kv_heads=int(data["num_kv_heads"]),  # type: ignore[call-overload]
                head_dim=int(data["head_dim"]),  # type: ignore[call-overload]
                dtype=str(data.get("dtype", "float16")),
                block_size=int(data.get("block_size", 16)),  # type: ignore[call-overload]
            )
        except KeyError as exc:
            raise LayoutError(f"KV layout is missing {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, LayoutError):
                raise
            raise LayoutError(f"KV layout has a non-integer field: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Everything that makes one model's KV incompatible with another's."""

    name: str
    layout: KVLayout
    revision: str = "main"
    tp_size: int = 1
    tp_rank: int = 0
    #: how an engine arranges a block's bytes when it is not kvmarina's layout (e.g.
    #: ``vllm-cpu``): engines of different formats must never read each other's blocks
    kv_format: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise LayoutError("model name must not be empty")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(
                f"tensor-parallel rank {self.tp_rank} is outside 0..{self.tp_size - 1}"
            )

    def canonical(self) -> str:
        """The stable string that seeds block hashes, e.g.
        ``llama-tiny@main|L4/H2/D64/float16/B16|tp0of1``."""
        base = (
            f"{self.name}@{self.revision}|{self.layout.describe()}|tp{self.tp_rank}of{self.tp_size}"
        )
        return f"{base}|{self.kv_format}" if self.kv_format else base


_DESCRIBED = re.compile(r"L(\d+)/H(\d+)/D(\d+)/(\w+)/B(\d+)")


def identity_layout(identity: str) -> KVLayout | None:
    """The KV layout a canonical identity names (``ModelIdentity.canonical``: its
    ``L../H../D../dtype/B..`` part), or ``None`` where it names none readable."""
    for part in identity.split("|")[1:2]:
        m = _DESCRIBED.fullmatch(part)
        if m is not None:
            try:
                return KVLayout(int(m[1]), int(m[2]), int(m[3]), m[4], int(m[5]))
            except LayoutError:
                return None
    return None


def hf_kv_shape(config: dict[str, object]) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a Hugging Face ``config.json``."""

    def field(key: str, default: object = None) -> int:
        value = config.get(key, default)
        if value is None:
            raise LayoutError(f"config.json is missing {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"config.json: {key} must be a positive integer, got {value!r}")
        return value

    heads = field("num_attention_heads")
    head_dim = field("head_dim") if config.get("head_dim") else field("hidden_size") // heads
    return field("num_hidden_layers"), field("num_key_value_heads", heads), head_dim


#: KV shape (num_layers, num_kv_heads, head_dim) of the size presets (``kvmarina.presets``),
#: so that planners (operator, local mode) can name a preset model's identity without
#: loading the engine.
PRESET_KV_SHAPES: dict[str, tuple[int, int, int]] = {
    name: hf_kv_shape(doc) for name, doc in PRESET_CONFIGS.items()
}


def preset_identity(
    preset: str, name: str, revision: str, dtype: str, block_size: int, kv_format: str = ""
) -> ModelIdentity:
    layers, heads, dim = PRESET_KV_SHAPES[preset]
    layout = KVLayout(layers, heads, dim, dtype, block_size)
    return ModelIdentity(name, layout, revision, kv_format=kv_format)


def folder_identity(
    folder: str | Path,
    name: str,
    revision: str,
    dtype: str,
    block_size: int,
    kv_format: str = "",
) -> ModelIdentity:
    """The identity of a Hugging Face model folder, from its ``config.json``: the one
    function router, engine and local mode use for a model that is not a preset, so all
    of them seed block hashes alike."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise LayoutError(f"{path} is not a JSON object")
    layers, heads, dim = hf_kv_shape(config)
    layout = KVLayout(layers, heads, dim, dtype, block_size)
    return ModelIdentity(name, layout, revision, kv_format=kv_format)
