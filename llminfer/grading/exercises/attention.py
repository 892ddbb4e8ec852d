"""Chapter 2, attention: the causal mask, and causal scaled dot-product attention with grouped-query heads.

One sequence at a time. Its last `num_queries` tokens ask (a prefill asks with all of them, a decode step
with one) and attend over `num_keys` tokens, so query i sits at position `num_keys - num_queries + i`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.grading.compare import expect_close, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest

MIRRORS = ("llminfer.attention", "llminfer.kernels")   # llminfer's own attention and masks are switched off

CHAPTER = "chapters/basics/02_attention"


def reference_causal_mask(num_queries: int, num_keys: int) -> torch.Tensor:
    """[num_queries, num_keys], True where query i may see key j: j <= num_keys - num_queries + i."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool).tril(diagonal=num_keys - num_queries)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [heads, Tq, d] over k, v [kv_heads, Tk, d], through PyTorch's own kernel."""
    mask = reference_causal_mask(q.shape[-2], k.shape[-2]).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[0] != k.shape[0])


def _mask_test(num_queries: int, num_keys: int):
    return lambda f: expect_close(f(num_queries, num_keys), reference_causal_mask(num_queries, num_keys), "the mask")


def _attention_test(heads: int, kv_heads: int, num_queries: int, num_keys: int, head_dim: int, seed: int,
                    dtype: torch.dtype = torch.float32, scale: float = 1.0):
    def run(attention) -> str:
        g = seeded(seed)
        q = (torch.randn(heads, num_queries, head_dim, generator=g) * scale).to(dtype)
        k = (torch.randn(kv_heads, num_keys, head_dim, generator=g) * scale).to(dtype)
        v = torch.randn(kv_heads, num_keys, head_dim, generator=g).to(dtype)
        # The reference in fp32 (fp16 matmuls are missing on some CPUs), compared at the dtype's tolerance.
        expected = reference_attention(q.float(), k.float(), v.float()).to(dtype)
        return expect_close(attention(q.clone(), k.clone(), v.clone()), expected, "the output")

    return run


CAUSAL_MASK_TESTS = (
    ExerciseTest("square: 5 queries over 5 keys", 1, _mask_test(5, 5)),
    ExerciseTest("decode: 1 query over 7 keys sees them all", 1, _mask_test(1, 7)),
    ExerciseTest("chunk: 3 queries over 8 keys", 2, _mask_test(3, 8)),
    ExerciseTest("one token: 1 query over 1 key", 1, _mask_test(1, 1)),
)

ATTENTION_TESTS = (
    ExerciseTest("one head, 5 tokens, head_dim 24", 1, _attention_test(1, 1, 5, 5, 24, seed=21)),
    ExerciseTest("4 heads, 9 tokens, head_dim 16", 1, _attention_test(4, 4, 9, 9, 16, seed=22)),
    ExerciseTest("grouped-query: 6 heads share 2 KV heads", 2, _attention_test(6, 2, 7, 7, 24, seed=23)),
    ExerciseTest("decode: 1 query over 9 keys, one KV head", 2, _attention_test(4, 1, 1, 9, 24, seed=24)),
    ExerciseTest("chunk: 3 queries over 10 keys, 2 KV heads", 2, _attention_test(4, 2, 3, 10, 32, seed=25)),
    ExerciseTest("large scores: the softmax must not overflow", 1,
                 _attention_test(2, 2, 6, 6, 24, seed=26, scale=30.0)),
    ExerciseTest("fp16 in, fp16 out", 1, _attention_test(4, 2, 5, 5, 24, seed=27, dtype=torch.float16), visible=False),
)

EXERCISES = [
    Exercise("causal_mask", "the causal mask of a chunk of queries", CHAPTER, "causal_mask", reference_causal_mask,
             CAUSAL_MASK_TESTS, mirrors=MIRRORS),
    Exercise("attention", "causal attention with grouped-query heads", CHAPTER, "attention", reference_attention,
             ATTENTION_TESTS, mirrors=MIRRORS),
]
