"""The Llama decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU.

The same code runs Llama, Mistral, Qwen2 and Qwen3 (see `ModelConfig`). Parameter names
follow Hugging Face's layout (without the `model.` prefix), so a checkpoint loads by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llminfer.attention import AttentionMetadata
from llminfer.attention.backend import paged_attention
from llminfer.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares overflows or loses precision in fp16/bf16. One fused op
        # (x * rsqrt(mean(x^2) + eps)) rather than five: at batch 1 each op's fixed cost is what counts.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotation frequency of each pair of dimensions, theta^(-2i/head_dim), after any scaling."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    scaling = scaling or {}
    if scaling.get("rope_type") == "linear":
        # Position interpolation: positions are divided by the factor, i.e. every frequency is.
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's context extension: slow the low frequencies (long wavelengths) by `factor`,
    keep the high ones, and interpolate smoothly in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # smooth = 0 for wavelengths longer than original/low (fully scaled), 1 below original/high (kept).
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles `position * inv_freq`, shape [..., head_dim]."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head of x [..., tokens, heads, head_dim] by the
    angles of its token, cos/sin [..., tokens, head_dim] (the "rotate half" layout)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's query and key, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                meta: AttentionMetadata | None = None) -> torch.Tensor:
        """x is [batch, length, hidden] (no cache) or a flattened batch [tokens, hidden] with a cache."""
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:
            # Grouped-query attention: each KV head serves num_heads / num_kv_heads query heads.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
            out = out.transpose(1, 2)
        else:
            out = paged_attention(q, k, v, *kv_cache, meta)  # store the new keys/values, then read all
        return self.o_proj(out.reshape(*shape, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                meta: AttentionMetadata | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A decoder-only transformer that maps token ids to next-token logits.

    Without a cache: ids [batch, length] -> logits [batch, length, vocab], causal attention.
    With a cache (`kv_cache.layer(i)` gives layer i's K and V) and its `AttentionMetadata`:
    a flattened batch of new tokens [tokens] -> logits [tokens, vocab], attending to the cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, kv_cache=None, meta: AttentionMetadata | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """`logits_indices` picks the rows (of the flattened batch) that need logits; by default all do."""
        if (kv_cache is None) != (meta is None):
            raise ValueError("pass both kv_cache and meta, or neither")
        positions = meta.positions if meta is not None else torch.arange(input_ids.shape[-1], device=input_ids.device)
        cfg = self.config
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache.layer(i) if kv_cache is not None else None, meta)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.norm(x))
