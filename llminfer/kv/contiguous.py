"""Part I's KV cache: each sequence owns one preallocated region of `max_len` tokens.

Per layer, K and V are [batch, max_len, kv_heads, head_dim]. In the paged vocabulary of
Part II that is a cache with `block_size = max_len` where sequence i owns block i, so the
model reads it through the same `AttentionMetadata` as the paged cache.
"""

from __future__ import annotations

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.models.config import ModelConfig


class ContiguousKVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch_size   # tokens stored so far, per sequence

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V cache of one layer, shaped [num_blocks, block_size, kv_heads, head_dim]."""
        return self.k[index], self.v[index]

    def append(self, num_new_tokens: list[int]) -> AttentionMetadata:
        """Reserve room for `num_new_tokens[i]` more tokens of sequence i; the metadata says where they go."""
        for i, (length, new) in enumerate(zip(self.lengths, num_new_tokens, strict=True)):
            if length + new > self.max_len:
                raise ValueError(f"sequence {i} would hold {length + new} tokens; the cache holds {self.max_len}")
        meta = AttentionMetadata.build(num_new_tokens, self.lengths, [[i] for i in range(len(self.lengths))],
                                       block_size=self.max_len, device=self.k.device)
        self.lengths = [length + new for length, new in zip(self.lengths, num_new_tokens, strict=True)]
        return meta

    @property
    def nbytes(self) -> int:
        """Memory held: 2 (K and V) x layers x batch x max_len x kv_heads x head_dim x bytes."""
        return self.k.nbytes + self.v.nbytes
