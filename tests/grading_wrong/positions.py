"""Wrong rotary embeddings."""

import torch


def _rope(x, positions, theta, pairs="halves", sign=1.0, exponent=2.0, use_positions=True, angle_dtype=None):
    """RoPE with one switch flipped from the right one (the defaults)."""
    d = x.shape[-1]
    dtype = angle_dtype or torch.float32
    inv_freq = theta ** -(exponent * torch.arange(d // 2, dtype=dtype) / d)
    where = positions if use_positions else torch.arange(x.shape[0])
    angles = where.to(dtype)[:, None] * inv_freq              # [tokens, d/2]
    cos, sin = angles.cos().float()[:, None, :], sign * angles.sin().float()[:, None, :]
    x32 = x.float()
    if pairs == "halves":
        x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:   # GPT-J's layout: pairs of neighbours (2i, 2i + 1)
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return out.to(x.dtype)


WRONG = {
    "rope": {
        "pairs neighbours (2i, 2i+1)": lambda x, p, theta=10000.0: _rope(x, p, theta, pairs="neighbours"),
        "rotates the wrong way": lambda x, p, theta=10000.0: _rope(x, p, theta, sign=-1.0),
        "frequencies theta^(-i/d)": lambda x, p, theta=10000.0: _rope(x, p, theta, exponent=1.0),
        "ignores positions, uses 0..n-1": lambda x, p, theta=10000.0: _rope(x, p, theta, use_positions=False),
        "angles in x's dtype": lambda x, p, theta=10000.0: _rope(x, p, theta, angle_dtype=x.dtype),
    },
}
