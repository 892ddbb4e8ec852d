"""Store each new token's key and value in the paged KV cache: one Triton program per token.

The cache is [num_blocks, block_size, num_kv_heads, head_dim] (one K and one V tensor); token t
goes to slot `slot_mapping[t] = block_id * block_size + offset`, and slot -1 means "skip" (padding).
The plain-PyTorch reference is `llminfer.attention.reference.write_kv`. A quantized cache
(`llminfer.kv.quantized`) gets each head's row as one-byte codes followed by its fp32 scale.
"""

from __future__ import annotations

import torch

from llminfer.attention.reference import write_kv
from llminfer.kv.quantized import MIN_SCALE, head_dim_of, is_quantized, largest_code

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the torch reference is the only path
    triton = tl = None

jit = triton.jit if triton is not None else lambda fn: fn


@jit
def _store_kv_kernel(k, v, k_cache, v_cache, slot_mapping,
                     stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                     stride_cache_block, stride_cache_slot, stride_cache_head,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, LARGEST: tl.constexpr,
                     TINY: tl.constexpr, ROUND: tl.constexpr):
    token = tl.program_id(0)
    # int64: block_id * stride_cache_block overflows int32 once the cache passes 2^31 elements.
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # Both tile dims are padded to powers of two; the mask keeps the padding out of memory.
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    row_starts = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_slot \
        + heads * stride_cache_head
    cache_offsets = row_starts[:, None] + dims[None, :]
    key = tl.load(k + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    value = tl.load(v + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    if QUANT:
        _store_rows(k_cache, row_starts, dims, key, mask, HEAD_DIM, NUM_KV_HEADS, LARGEST, TINY, ROUND)
        _store_rows(v_cache, row_starts, dims, value, mask, HEAD_DIM, NUM_KV_HEADS, LARGEST, TINY, ROUND)
    else:
        tl.store(k_cache + cache_offsets, key.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + cache_offsets, value.to(v_cache.dtype.element_ty), mask=mask)


@jit
def _store_rows(cache, row_starts, dims, x, mask, HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                LARGEST: tl.constexpr, TINY: tl.constexpr, ROUND: tl.constexpr):
    """Quantize each head's row of x [BLOCK_H, BLOCK_D] with its own scale, max|x| / LARGEST (at least TINY),
    and store the codes at the row's start and the fp32 scale in the 4 bytes after them (as
    `llminfer.kv.quantized.quantize_rows` does)."""
    x = tl.where(mask, x.to(tl.float32), 0.0)
    scale = tl.maximum(tl.max(tl.abs(x), 1) / LARGEST, TINY)
    scaled = tl.minimum(tl.maximum(x / scale[:, None], -LARGEST), LARGEST)
    if ROUND:   # int8: round half away from zero (quantize_rows does the same); no libdevice rint needed
        scaled = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(0.5 - scaled))
    tl.store(cache + row_starts[:, None] + dims[None, :], scaled.to(cache.dtype.element_ty), mask=mask)
    heads = tl.arange(0, x.shape[0])
    tl.store((cache + row_starts + HEAD_DIM).to(tl.pointer_type(tl.float32)), scale, mask=heads < NUM_KV_HEADS)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Launch `_store_kv_kernel`: one program per token, each writing all its KV heads."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if (k_cache.shape[2] != num_kv_heads or head_dim_of(k_cache) != head_dim or v.shape != k.shape
            or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype):
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit caches "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv: caches must share strides, and every head_dim must be contiguous")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT=is_quantized(k_cache), LARGEST=largest_code(k_cache.dtype) if is_quantized(k_cache) else 1.0,
        TINY=MIN_SCALE, ROUND=k_cache.dtype == torch.int8,
    )


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write K and V [num_tokens, num_kv_heads, head_dim] into the caches at `slot_mapping` (-1: skip).

    On CUDA the Triton kernel runs; elsewhere the torch reference `write_kv`.
    """
    if k.is_cuda and triton is not None:
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv(k_cache, v_cache, k, v, slot_mapping)
