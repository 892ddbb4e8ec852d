"""Answer key for the exercise `causal_mask` (chapter 2, attention): the causal mask of a chunk of queries."""

from __future__ import annotations

import torch


def causal_mask(num_queries: int, num_keys: int) -> torch.Tensor:
    """A bool tensor [num_queries, num_keys], True where query i may see key j:
    j <= num_keys - num_queries + i (the queries are the last num_queries tokens)."""
    # The queries are the last `num_queries` tokens of the sequence, so query i sits at this position.
    query_positions = torch.arange(num_queries) + (num_keys - num_queries)
    key_positions = torch.arange(num_keys)
    # A query sees every key at or before its own position: [num_queries, 1] against [1, num_keys].
    return key_positions[None, :] <= query_positions[:, None]
