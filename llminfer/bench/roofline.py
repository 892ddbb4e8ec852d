"""The roofline model of a forward pass: FLOPs and bytes counted from the model's shapes, and the
machine's two ceilings (matmul FLOP/s and copy bandwidth) measured.

A pass adds `num_new_tokens` tokens to each of `batch_size` sequences that already hold
`context_len` tokens in the KV cache: prefill is `context_len = 0`, a decode step is `num_new_tokens = 1`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from llminfer.bench.record import summarize
from llminfer.kv.contiguous import ContiguousKVCache
from llminfer.models.config import ModelConfig


def _matmul_weights_per_token(config: ModelConfig) -> int:
    """Weights each token multiplies: q/k/v/o and gate/up/down in every layer, and the lm_head."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    return config.num_layers * per_layer + h * config.vocab_size


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the model `config` describes (a tied embedding counted once)."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = 2 * h                                   # the two RMSNorm weights
    per_layer += q + 2 * kv if config.qkv_bias else 0
    per_layer += h if config.o_bias else 0
    per_layer += 2 * config.head_dim if config.qk_norm else 0
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * h   # tied: it is the lm_head
    return _matmul_weights_per_token(config) + config.num_layers * per_layer + h + embedding


def forward_flops(config: ModelConfig, num_new_tokens: int, context_len: int, batch_size: int = 1) -> int:
    """FLOPs of one forward pass, 2 per multiply-add: the matmuls, and causal attention over the context.

    Elementwise work (norms, RoPE, SiLU, softmax, biases) is left out: per token it is O(hidden),
    against O(hidden^2) for the matmuls. Every new token's logits are computed, as `Llama` does.
    """
    matmuls = 2 * num_new_tokens * _matmul_weights_per_token(config)
    # New token j sits at position context_len + j and attends to context_len + j + 1 keys;
    # scores (q.k) and the weighted sum of values each cost 2 * head_dim FLOPs per head and key.
    keys = num_new_tokens * context_len + num_new_tokens * (num_new_tokens + 1) // 2
    attention = config.num_layers * 4 * config.num_heads * config.head_dim * keys
    return batch_size * (matmuls + attention)


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of one token's keys and values, over all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def forward_bytes(config: ModelConfig, num_new_tokens: int, context_len: int, dtype_bytes: int,
                  batch_size: int = 1) -> int:
    """Least memory traffic of one forward pass: every weight read once (shared by the batch), each
    sequence's cached keys and values read and the new ones written.

    Of an untied embedding table only the new tokens' rows are read. Activations are left out: a fused
    implementation keeps them on chip, and in decode they are a few vectors per token.
    """
    weights = parameter_count(config)
    tokens = batch_size * num_new_tokens
    if not config.tie_word_embeddings:   # tied: the lm_head reads the whole table anyway
        weights += tokens * config.hidden_size - config.vocab_size * config.hidden_size
    kv = batch_size * (context_len + num_new_tokens) * kv_bytes_per_token(config, dtype_bytes)
    return weights * dtype_bytes + kv


def arithmetic_intensity(config: ModelConfig, num_new_tokens: int, context_len: int, dtype_bytes: int,
                         batch_size: int = 1) -> float:
    """FLOPs per byte of memory traffic of one forward pass."""
    return (forward_flops(config, num_new_tokens, context_len, batch_size)
            / forward_bytes(config, num_new_tokens, context_len, dtype_bytes, batch_size))


def attainable(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline: FLOP/s a kernel of this intensity can reach, limited by compute or by memory."""
    return min(peak_flops, intensity * bandwidth)


def timed(fn: Callable[[], object], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn`, `repeats` times after `warmup` calls; on CUDA timed with events."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    seconds = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)   # elapsed_time is in milliseconds
        return seconds
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Compute ceiling: FLOP/s of an n x n by n x n matmul (2 n^3 FLOPs), median of `repeats`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / statistics.median(timed(lambda: torch.mm(a, b, out=out), device, repeats))


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 2**28, repeats: int = 5) -> float:
    """Memory ceiling: bytes/s of copying `nbytes` between two buffers (read + written), median of `repeats`.

    Pick `nbytes` well above the last-level cache, or this measures the cache."""
    source = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    return 2 * source.nbytes / statistics.median(timed(lambda: target.copy_(source), device, repeats))


@torch.no_grad()
def time_forward(model: torch.nn.Module, num_new_tokens: int, context_len: int, batch_size: int = 1,
                 repeats: int = 5) -> list[float]:
    """Seconds per forward pass (cache metadata included) of the pass `forward_flops` counts."""
    param = next(model.parameters())
    cache = ContiguousKVCache(model.config, batch_size, context_len + num_new_tokens,
                              device=param.device, dtype=param.dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch_size * num_new_tokens,), device=param.device)

    def step() -> None:
        # Rewind so every repeat sees the same context. The cached keys are zeros: attention costs
        # the same whatever they hold.
        cache.lengths = [context_len] * batch_size
        model(ids, cache, cache.append([num_new_tokens] * batch_size))

    return timed(step, param.device, repeats)


def measure_points(model: torch.nn.Module, passes: list[tuple[int, int, int]], repeats: int = 5) -> list[dict]:
    """For each pass (num_new_tokens, context_len, batch_size): its counted FLOPs and bytes, its intensity,
    measured seconds, and achieved FLOP/s (counted FLOPs / median seconds)."""
    dtype_bytes = next(model.parameters()).element_size()
    points = []
    for num_new_tokens, context_len, batch_size in passes:
        flops = forward_flops(model.config, num_new_tokens, context_len, batch_size)
        nbytes = forward_bytes(model.config, num_new_tokens, context_len, dtype_bytes, batch_size)
        seconds = summarize(time_forward(model, num_new_tokens, context_len, batch_size, repeats))
        points.append({"num_new_tokens": num_new_tokens, "context_len": context_len, "batch_size": batch_size,
                       "flops": flops, "bytes": nbytes, "intensity": flops / nbytes, "seconds": seconds,
                       "flops_per_s": flops / seconds["median"]})
    return points
