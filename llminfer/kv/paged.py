"""Part II's KV cache: one pool of fixed-size blocks per layer, shared by every request.

Per layer, K and V are [num_blocks, block_size, kv_heads, head_dim]. A request does not own a
region; it owns a *block table*, the list of its block ids in order, and token t of the request
lives at slot `block_table[t // block_size] * block_size + t % block_size`. Memory is claimed one
block at a time as the sequence grows, so at most `block_size - 1` slots per request sit empty.
With `kv_cache_dtype="int8"` or `"fp8"` each head's row holds one-byte codes and its scale
(`llminfer.kv.quantized`), and the last dimension is head_dim + 4.
"""

from __future__ import annotations

import torch

from llminfer.kv.quantized import code_dtype, row_width
from llminfer.models.config import ModelConfig

CPU_KV_CACHE_BYTES = 2**30  # default pool on CPU: 1 GiB at most (on CUDA the pool is sized by profiling)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V for one block across all layers: rows of the model's `dtype`, or of codes and a scale."""
    codes = code_dtype(kv_cache_dtype)
    row_bytes = row_width(config.head_dim, codes) * (dtype if codes is None else codes).itemsize
    return 2 * config.num_layers * block_size * config.num_kv_heads * row_bytes


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "auto"):
        codes = code_dtype(kv_cache_dtype)
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, row_width(config.head_dim, codes))
        self.k = torch.zeros(shape, device=device, dtype=dtype if codes is None else codes)
        self.v = torch.zeros_like(self.k)
        self.num_blocks, self.block_size, self.kv_cache_dtype = num_blocks, block_size, kv_cache_dtype

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V cache of one layer, shaped [num_blocks, block_size, kv_heads, head_dim]."""
        return self.k[index], self.v[index]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def profile_free_memory(model: torch.nn.Module, num_tokens: int, utilization: float) -> int:
    """Bytes a CUDA KV pool may take: `utilization` of the GPU's memory, minus what is in use and
    the activation peak of a forward pass over `num_tokens` tokens (measured by running one)."""
    device = next(model.parameters()).device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        model(torch.zeros(1, num_tokens, dtype=torch.long, device=device))
    activation_peak = torch.cuda.max_memory_allocated(device) - before
    free, total = torch.cuda.mem_get_info(device)
    # Memory others hold (other processes, the allocator's cache) is total - free; keep out of it.
    return int(utilization * total - (total - free) - activation_peak)


def num_blocks_for(config: ModelConfig, block_size: int, dtype: torch.dtype, memory_bytes: int) -> int:
    """How many blocks fit in a memory budget."""
    return memory_bytes // kv_bytes_per_block(config, block_size, dtype)


def size_kv_pool(models: list[torch.nn.Module], num_kv_blocks: int | None, memory_bytes: int | None,
                 utilization: float, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, kv_cache_dtype: str = "auto") -> int:
    """The number of blocks of an engine's pool: `num_kv_blocks` if given, else what `memory_bytes` holds, else
    what every sequence at full length needs, capped by what is free on a GPU (measured) or a fixed budget on
    CPU. A block holds the entries of every model in `models` (the target, and a draft model that shares its
    block tables), in `kv_cache_dtype`."""
    if num_kv_blocks is not None and memory_bytes is not None:
        raise ValueError("give num_kv_blocks or kv_cache_memory_bytes, not both")
    if num_kv_blocks is not None:
        return num_kv_blocks
    param = next(models[0].parameters())
    block_bytes = sum(kv_bytes_per_block(m.config, block_size, param.dtype, kv_cache_dtype) for m in models)
    if memory_bytes is None:
        # Never more than every sequence at full length needs, so several small engines can share a GPU.
        full = -(-max_num_seqs * max_model_len // block_size) * block_bytes
        if param.device.type == "cuda":
            available = profile_free_memory(models[0], min(max_num_batched_tokens, max_model_len), utilization)
        else:
            available = CPU_KV_CACHE_BYTES
        memory_bytes = min(full, available)
    return max(memory_bytes, 0) // block_bytes
