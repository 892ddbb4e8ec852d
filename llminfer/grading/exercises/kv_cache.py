"""Chapter 4, the KV cache: a preallocated cache that new keys and values are appended to."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llminfer.attention import write_kv
from llminfer.grading.compare import Mismatch, expect_close, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.kv import ContiguousKVCache

CHAPTER = "chapters/basics/04_kv_cache"


class ReferenceKVCache:
    """One layer's cache for one sequence, on llminfer's `ContiguousKVCache` and `write_kv`."""

    def __init__(self, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
        shape = SimpleNamespace(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.cache = ContiguousKVCache(shape, batch_size=1, max_len=max_len, dtype=dtype)

    @property
    def length(self) -> int:
        return self.cache.lengths[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        meta = self.cache.append([k.shape[0]])      # raises ValueError, unchanged, when it would overflow
        k_cache, v_cache = self.cache.layer(0)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return k_cache[0, : self.length], v_cache[0, : self.length]


def _steps(new_tokens: list[int], kv_heads: int, head_dim: int, seed: int, dtype: torch.dtype = torch.float32):
    """Append chunks of `new_tokens[i]` tokens to a student's cache and the reference, comparing every step."""
    def run(cache_class) -> str:
        g = seeded(seed)
        student = cache_class(max_len=sum(new_tokens) + 2, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
        reference = ReferenceKVCache(sum(new_tokens) + 2, kv_heads, head_dim, dtype)
        for step, n in enumerate(new_tokens):
            k, v = torch.randn(2, n, kv_heads, head_dim, generator=g)   # fp32: the cache stores in its dtype
            expected = reference.append(k, v)
            keys, values = _pair(student.append(k.clone(), v.clone()), step)
            expect_close(keys, expected[0], f"the keys returned by append {step}")
            expect_close(values, expected[1], f"the values returned by append {step}")
            if student.length != reference.length:
                raise Mismatch(f"after append {step} the length is {student.length}, expected {reference.length}")
        return f"{len(new_tokens)} appends, {reference.length} tokens"

    return run


def _pair(returned: object, step: int) -> tuple[object, object]:
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise Mismatch(f"append {step} returned a {type(returned).__name__}, expected a tuple (keys, values)")
    return returned


def _refuses_overflow(cache_class) -> str:
    cache = cache_class(max_len=6, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    k = torch.randn(4, 2, 8, generator=seeded(41))
    cache.append(k, k)
    try:
        cache.append(k, k)
    except ValueError:
        if cache.length != 4:
            raise Mismatch(f"the length changed to {cache.length} although the append was refused") from None
        keys, _ = _pair(cache.append(k[:2], k[:2]), 2)
        expect_close(keys[:4], k, "the keys after a refused append")
        return "refused, and the cache still works"
    raise Mismatch("appending 4 tokens to a cache holding 4 of 6 did not raise ValueError")


EXERCISES = [
    Exercise("kv_cache_append", "appending to a contiguous KV cache", CHAPTER, "KVCache", ReferenceKVCache, (
        ExerciseTest("prefill 5 tokens, then 3 decode steps; one KV head, head_dim 24", 2,
                     _steps([5, 1, 1, 1], 1, 24, seed=42)),
        ExerciseTest("chunks of 3, 4, 1 tokens; 2 KV heads", 2, _steps([3, 4, 1], 2, 16, seed=43)),
        ExerciseTest("decode from an empty cache, one token at a time", 1, _steps([1] * 6, 2, 8, seed=44)),
        ExerciseTest("an append that does not fit raises ValueError and changes nothing", 2, _refuses_overflow),
        ExerciseTest("an fp16 cache stores and returns fp16", 1, _steps([4, 1], 2, 24, seed=45, dtype=torch.float16),
                     visible=False),
    ), mirrors=("llminfer.kv.contiguous", "llminfer.attention")),
]
