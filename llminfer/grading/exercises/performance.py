"""Chapter 5, the performance model: the bytes a decode step must move, the numerator of its speed limit."""

from __future__ import annotations

import dataclasses
from numbers import Integral

from llminfer.bench.roofline import forward_bytes
from llminfer.grading.compare import Mismatch, expect_equal_number
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.models.config import ModelConfig
from llminfer.models.registry import SHIPPED
from llminfer.grading import wire
from llminfer.grading.remote import send_type_as_recipe

# A model's shape crosses to the answer's process as its fields, rebuilt there (support.RECIPES).
send_type_as_recipe(ModelConfig, lambda config: wire.Recipe("model_config", (dataclasses.asdict(config),)))

CHAPTER = "chapters/basics/05_performance"

# Llama 3 8B's published shapes (untied lm_head), and a Qwen2-like model with q/k/v biases and tied embeddings.
LLAMA3_8B = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001,),
)
SMALL_TIED = dataclasses.replace(LLAMA3_8B, architecture="Qwen2ForCausalLM", vocab_size=997, hidden_size=96,
                                 intermediate_size=200, num_layers=3, num_heads=6, num_kv_heads=1, head_dim=24,
                                 qkv_bias=True, tie_word_embeddings=True)


def reference_decode_step_bytes(config: ModelConfig, context_len: int, dtype_bytes: int, batch_size: int = 1) -> int:
    """Least bytes a decode step moves: the weights once, each sequence's cached K and V, and the new ones."""
    return forward_bytes(config, 1, context_len, dtype_bytes, batch_size)


def _bytes_test(config: ModelConfig | str, context_len: int, dtype_bytes: int, batch_size: int):
    def run(decode_step_bytes) -> str:
        model = ModelConfig.from_pretrained(SHIPPED[config]) if isinstance(config, str) else config
        expected = reference_decode_step_bytes(model, context_len, dtype_bytes, batch_size)
        return expect_equal_number(decode_step_bytes(model, context_len, dtype_bytes, batch_size), expected,
                                   "the count")

    return run


def _returns_int(decode_step_bytes) -> str:
    value = decode_step_bytes(LLAMA3_8B, 100, 2, 1)
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise Mismatch(f"returned a {type(value).__name__} ({value!r}); a count of bytes is an int")
    return "an int"


EXERCISES = [
    Exercise("decode_bytes", "the bytes of one decode step", CHAPTER, "decode_step_bytes",
             reference_decode_step_bytes, (
                 ExerciseTest("tiny-shakespeare, fp32, context 256", 1, _bytes_test("tiny-shakespeare", 256, 4, 1)),
                 ExerciseTest("tiny-shakespeare, bf16, empty context", 1, _bytes_test("tiny-shakespeare", 0, 2, 1)),
                 ExerciseTest("Llama 3 8B, bf16, context 8191", 2, _bytes_test(LLAMA3_8B, 8191, 2, 1)),
                 ExerciseTest("Llama 3 8B, bf16, batch of 64 at context 1024", 2, _bytes_test(LLAMA3_8B, 1024, 2, 64)),
                 ExerciseTest("tied embeddings, q/k/v biases, one KV head, batch 3", 2,
                              _bytes_test(SMALL_TIED, 37, 4, 3)),
                 ExerciseTest("returns an int", 1, _returns_int, visible=False),
             ), mirrors=("llminfer.bench.roofline:forward_bytes", "llminfer.bench.roofline:arithmetic_intensity")),
]
