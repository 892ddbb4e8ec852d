"""Answer key for the exercise `rope` (chapter 3, positions): rotary position embeddings, "rotate half" layout."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x [tokens, heads, head_dim] with each pair (x[..., i], x[..., i + head_dim/2]) of token t
    rotated by the angle positions[t] * theta^(-2i/head_dim); returned in x's dtype."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions; head_dim {head_dim} is odd")

    # The rotation frequency of pair i is theta^(-2i/d), for i = 0 .. d/2 - 1: fast for the first pairs,
    # slow for the last.
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)

    # Angles in fp32, never in x's dtype: near position 700 neighbouring fp16 numbers are 0.5 apart, so an
    # fp16 angle would be off by up to a quarter of a radian for the fastest pair.
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq   # [tokens, d/2]
    # Every head of a token is rotated by the same angles: broadcast over the heads axis.
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]                     # [tokens, 1, d/2]

    # "Rotate half": dimension i is paired with dimension i + d/2, and each pair is rotated by its angle.
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)
