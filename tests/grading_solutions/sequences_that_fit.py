"""Answer key for the exercise `sequences_that_fit` (chapter 10, the anatomy of an engine): how many sequences'
KV blocks fit in the memory the weights leave free."""

from __future__ import annotations

from typing import TYPE_CHECKING

# The exercise's notebook hands the student `parameter_count` for the size of the weights; the answer uses it
# as the notebook does. The KV bytes per token are worked out below instead of importing kv_bytes_per_token.
from llminfer.bench.roofline import parameter_count

if TYPE_CHECKING:   # for the annotations only, as in the notebook
    from llminfer.models.config import ModelConfig


def _kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """One token's cache entry: a key and a value vector of head_dim numbers per KV head, in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def sequences_that_fit(config: ModelConfig, memory_bytes: int, dtype_bytes: int, context_len: int,
                       block_size: int = 16) -> int:
    """Sequences of `context_len` tokens whose KV blocks fit in the memory the weights leave free."""
    if context_len < 1 or block_size < 1:
        raise ValueError(f"context_len ({context_len}) and block_size ({block_size}) must be positive")

    free = memory_bytes - parameter_count(config) * dtype_bytes
    if free <= 0:
        return 0   # the weights alone do not fit: no room for any sequence

    # The free memory is cut into whole blocks of block_size tokens each; a partial block is useless.
    num_blocks = free // (block_size * _kv_bytes_per_token(config, dtype_bytes))
    # A sequence holds whole blocks: ceil(context_len / block_size), in integers (no float rounding).
    blocks_per_sequence = -(-context_len // block_size)
    return num_blocks // blocks_per_sequence
