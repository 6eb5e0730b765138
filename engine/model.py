"""A Llama-family decoder in torch: RMSNorm, rotary embeddings, GQA, SwiGLU.

Module names follow the Hugging Face Llama layout (``model.layers.0.self_attn.
q_proj.weight`` ...), so a checkpoint's state dict loads without renaming.

The model does not own a KV cache. Each forward takes a flat batch of new
tokens (prefill chunks and decode tokens of many sequences, concatenated) and
an ``Attention`` object that stores K/V and attends however it likes: the
paged cache over the agent's pages (``kvmarina.engine.paged``) or a plain
contiguous cache (the benchmark baseline). That keeps the maths here and the
memory management elsewhere.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kvmarina.engine.config import ModelConfig

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class Attention(Protocol):
    """Stores this step's K/V for a layer and returns attention output.

    ``q``: [T, num_heads, head_dim]; ``k``, ``v``: [T, num_kv_heads, head_dim]
    for the T new tokens of the step (already rotated). Returns [T, num_heads,
    head_dim]. Each new token attends causally to its own sequence: the cached
    prefix plus the new tokens up to and including itself.
    """

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for stability in half precision, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, "rotate half" (non-interleaved) convention."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        attention: Attention,
        layer: int,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, positions)
        out = attention(layer, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The whole model. ``forward`` returns logits of the requested rows only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention: Attention,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """``tokens``, ``positions``: [T] int64; ``logits_rows``: indices into T
        (usually the last new token of each sequence). Returns [len(rows), vocab] float32."""
        x = self.model.embed_tokens(tokens)
        layers: list[DecoderLayer] = list(self.model.layers)  # type: ignore[arg-type]
        for i, layer in enumerate(layers):
            h = layer.self_attn(layer.input_layernorm(x), positions, self.rotary, attention, i)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.model.norm(x[logits_rows])
        return self.lm_head(x).float()  # type: ignore[no-any-return]


def build_model(cfg: ModelConfig, seed: int | None = 0) -> LlamaForCausalLM:
    """A model of ``cfg``'s shape; with a seed, deterministic random weights."""
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    std = 0.02 if "embed" in name else 1.0 / (p.shape[-1] ** 0.5)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    else:
        model = LlamaForCausalLM(cfg)
    return model.to(DTYPES[cfg.dtype]).eval()
