"""Chapter 3, positions: rotary position embeddings (RoPE) in the "rotate half" layout Llama uses."""

from __future__ import annotations

import torch

from llminfer.grading.compare import expect_close, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.models.llama import apply_rope, rope_cos_sin, rope_inv_freq

CHAPTER = "chapters/basics/03_positions"


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x [tokens, heads, head_dim] with each pair (i, i + head_dim/2) rotated by positions * theta^(-2i/head_dim)."""
    return apply_rope(x, *rope_cos_sin(positions, rope_inv_freq(x.shape[-1], theta)))


def _rope_test(positions: list[int], heads: int, head_dim: int, seed: int, theta: float = 10000.0,
               dtype: torch.dtype = torch.float32):
    def run(rope) -> str:
        x = torch.randn(len(positions), heads, head_dim, generator=seeded(seed)).to(dtype)
        where = torch.tensor(positions)
        expected = reference_rope(x, where, theta)
        return expect_close(rope(x.clone(), where.clone(), theta), expected, "the rotated x")

    return run


EXERCISES = [
    Exercise("rope", "rotary position embeddings", CHAPTER, "apply_rope", reference_rope, (
        ExerciseTest("positions 0..4, 2 heads, head_dim 24", 2, _rope_test(list(range(5)), 2, 24, seed=31)),
        ExerciseTest("position 0 leaves x unchanged", 1, _rope_test([0, 0], 3, 16, seed=32)),
        ExerciseTest("decode: one token at position 37, head_dim 64", 1, _rope_test([37], 4, 64, seed=33)),
        ExerciseTest("positions that are not 0, 1, 2, ...: [3, 10, 11, 500]", 2,
                     _rope_test([3, 10, 11, 500], 2, 24, seed=34)),
        ExerciseTest("theta = 500000 (Llama 3)", 1, _rope_test(list(range(6)), 1, 32, seed=35, theta=500000.0)),
        ExerciseTest("fp16 in, fp16 out (angles in fp32)", 1,
                     _rope_test([0, 1, 700, 1023], 2, 24, seed=36, dtype=torch.float16), visible=False),
    ), mirrors=("llminfer.models.llama",)),
]
