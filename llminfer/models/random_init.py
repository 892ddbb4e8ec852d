"""Randomly initialised checkpoints shaped like real models, for benchmarks where weights cannot be
downloaded: speed depends on the shapes, not on the values. The tokenizer is the shipped one, so
benchmarks feed token ids and skip detokenization (`SamplingParams(detokenize=False)`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llminfer.environment import cache_root

RANDOM_MODELS = {
    # Qwen3-0.6B's published shape (the nano-vllm benchmark model).
    "qwen3-0.6b-random": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    # Small enough for a CPU test of the same code path.
    "llama-tiny-random": ("LlamaConfig", dict(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)),
}


def random_checkpoint(name: str, root: str | Path | None = None) -> Path:
    """Write (once) a Hugging Face-format checkpoint of the named shape with seeded random weights (bf16),
    under `root`, else `$LLMINFER_CACHE/random`, else `~/.cache/llminfer/random`."""
    import transformers

    from llminfer.models.registry import ASSETS, DEFAULT_MODEL

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; known: {', '.join(RANDOM_MODELS)}")
    path = Path(root or cache_root() / "random") / name
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    config_class, kwargs = RANDOM_MODELS[name]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / DEFAULT_MODEL / file, path / file)
    return path
