"""Answer key for the exercise `kv_cache_append` (chapter 4, the KV cache): appending to a contiguous cache."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of up to max_len tokens, each [num_kv_heads, head_dim], stored in `dtype`."""

    def __init__(self, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
        self.max_len = max_len
        # All the room is reserved up front, so an append never reallocates or copies the cached tokens.
        self._keys = torch.zeros(max_len, num_kv_heads, head_dim, dtype=dtype)
        self._values = torch.zeros(max_len, num_kv_heads, head_dim, dtype=dtype)
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens stored so far."""
        return self._length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k and v [new_tokens, num_kv_heads, head_dim] after the cached tokens; return
        (keys, values) of all tokens so far, each [length, num_kv_heads, head_dim] in the cache's dtype."""
        start, new_tokens = self._length, k.shape[0]
        expected = (self._keys.shape[1], self._keys.shape[2])
        if k.shape != v.shape or tuple(k.shape[1:]) != expected:
            raise ValueError(f"k and v must both be [new_tokens, {expected[0]}, {expected[1]}]; "
                             f"got {list(k.shape)} and {list(v.shape)}")
        # Check the room before writing anything, so that a refused append leaves the cache as it was.
        if start + new_tokens > self.max_len:
            raise ValueError(f"cannot append {new_tokens} tokens to a cache holding {start} of {self.max_len}")

        end = start + new_tokens
        # Slice assignment copies into the preallocated buffers and casts to the cache's dtype (fp32 -> fp16).
        self._keys[start:end] = k
        self._values[start:end] = v
        self._length = end
        # Views of the buffers, not copies: every token so far, ready for attention.
        return self._keys[:end], self._values[:end]
