"""Chapter 10, the anatomy of an engine: how many sequences fit in the KV blocks left next to the weights."""

from __future__ import annotations

from numbers import Integral

from llminfer.bench.roofline import kv_bytes_per_token, parameter_count
from llminfer.grading.compare import Mismatch, expect_equal_number
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading.exercises.performance import LLAMA3_8B, SMALL_TIED
from llminfer.models.config import ModelConfig
from llminfer.models.registry import SHIPPED

CHAPTER = "chapters/engine/10_anatomy"


def reference_sequences_that_fit(config: ModelConfig, memory_bytes: int, dtype_bytes: int, context_len: int,
                                 block_size: int = 16) -> int:
    """Sequences of `context_len` tokens whose KV blocks fit in the memory the weights leave free."""
    free = memory_bytes - parameter_count(config) * dtype_bytes
    if free <= 0:
        return 0
    num_blocks = free // (block_size * kv_bytes_per_token(config, dtype_bytes))
    return num_blocks // -(-context_len // block_size)   # a sequence holds whole blocks


def _fit_test(config: ModelConfig | str, memory_bytes: int, dtype_bytes: int, context_len: int, block_size: int):
    def run(sequences_that_fit) -> str:
        model = ModelConfig.from_pretrained(SHIPPED[config]) if isinstance(config, str) else config
        expected = reference_sequences_that_fit(model, memory_bytes, dtype_bytes, context_len, block_size)
        got = sequences_that_fit(model, memory_bytes, dtype_bytes, context_len, block_size)
        return expect_equal_number(got, expected, "the number of sequences")

    return run


def _returns_int(sequences_that_fit) -> str:
    value = sequences_that_fit(LLAMA3_8B, 80 * 10**9, 2, 4096, 16)
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise Mismatch(f"returned a {type(value).__name__} ({value!r}); a number of sequences is an int")
    return "an int"


GB = 10**9
EXERCISES = [
    Exercise("sequences_that_fit", "sequences that fit next to the weights", CHAPTER, "sequences_that_fit",
             reference_sequences_that_fit, (
                 ExerciseTest("tiny-shakespeare, fp32, 64 MB, context 1024", 1,
                              _fit_test("tiny-shakespeare", 64 * 10**6, 4, 1024, 16)),
                 ExerciseTest("Llama 3 8B, bf16, 80 GB, context 8192", 2, _fit_test(LLAMA3_8B, 80 * GB, 2, 8192, 16)),
                 ExerciseTest("a context that ends mid-block (1000 tokens, blocks of 16)", 2,
                              _fit_test(LLAMA3_8B, 80 * GB, 2, 1000, 16)),
                 ExerciseTest("blocks of 256 tokens", 1, _fit_test(LLAMA3_8B, 141 * GB, 2, 3000, 256)),
                 ExerciseTest("weights larger than the memory", 1, _fit_test(LLAMA3_8B, 10 * GB, 2, 512, 16)),
                 ExerciseTest("one KV head, tied embeddings", 1, _fit_test(SMALL_TIED, 3 * 10**6, 4, 77, 8)),
                 ExerciseTest("returns an int", 1, _returns_int, visible=False),
             )),   # kv_bytes_per_token and parameter_count are the building blocks the exercise hands out
]
