"""Answer key for the exercise `decode_bytes` (chapter 5, the performance model): the bytes of one decode step."""

from __future__ import annotations

from typing import TYPE_CHECKING

# The exercise's notebook hands the student `parameter_count` (counting the parameters is another chapter's
# business; this exercise is about the traffic), so the answer uses it, as the notebook does.
from llminfer.bench.roofline import parameter_count

if TYPE_CHECKING:   # for the annotations only, as in the notebook
    from llminfer.models.config import ModelConfig


def _kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """One token's cache entry: a key and a value vector of head_dim numbers per KV head, in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def decode_step_bytes(config: ModelConfig, context_len: int, dtype_bytes: int, batch_size: int = 1) -> int:
    """Least bytes one decode step moves: the weights once, and each sequence's cached and new K and V."""
    # Every weight is read once per step, and the whole batch shares that read.
    weights = parameter_count(config)
    if not config.tie_word_embeddings:
        # An untied embedding table is only looked up: the step reads one row (hidden_size numbers) per
        # sequence's new token, not the whole table. A tied table is the lm_head too and is read whole.
        weights += batch_size * config.hidden_size - config.vocab_size * config.hidden_size

    # Each sequence reads the K and V of its context_len cached tokens and writes those of its 1 new token.
    kv = batch_size * (context_len + 1) * _kv_bytes_per_token(config, dtype_bytes)

    return weights * dtype_bytes + kv   # integers throughout: an exact count of bytes
