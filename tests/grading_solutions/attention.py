"""Answer key for the exercise `attention` (chapter 2, attention): causal attention with grouped-query heads."""

from __future__ import annotations

import math

import torch


def _causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """[num_queries, num_keys], True where query i (at position num_keys - num_queries + i) may see key j."""
    query_positions = torch.arange(num_queries, device=device) + (num_keys - num_queries)
    key_positions = torch.arange(num_keys, device=device)
    return key_positions[None, :] <= query_positions[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [heads, num_queries, d] over k and v [kv_heads, num_keys, d]:
    softmax(q k^T / sqrt(d), masked) v, shaped [heads, num_queries, d] in q's dtype."""
    heads, num_queries, d = q.shape
    kv_heads, num_keys, _ = k.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be shared evenly by {kv_heads} KV heads")

    # Grouped-query attention: query heads h*group ... h*group + group - 1 share KV head h. That is
    # repeat_interleave (each KV head repeated `group` times in a row), not repeat (the KV heads tiled).
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)

    # Scores in fp32 whatever the input dtype: fp16 scores of large vectors lose precision or overflow.
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(d)        # [heads, num_queries, num_keys]
    scores = scores.masked_fill(~_causal_mask(num_queries, num_keys, q.device), float("-inf"))

    # A softmax that cannot overflow: subtract each row's maximum first, so the largest exponent is
    # exp(0) = 1. Every query sees at least the key at its own position, so the maximum is finite, and
    # the masked scores become exp(-inf) = 0. (torch.softmax does exactly this internally.)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)

    return (weights @ v.float()).to(q.dtype)
