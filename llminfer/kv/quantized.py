"""A quantized KV cache: one byte per value, and each stored row carries its own scale.

The paged cache of Part II stores every key and value at the model's precision. Here a cache row (one
token's vector for one KV head, `head_dim` values) is stored as `head_dim` one-byte codes followed by
the row's fp32 scale in 4 more bytes, as llama.cpp's q8_0 blocks carry theirs:

    [ code_0 code_1 ... code_{d-1} | scale (4 bytes) ]      value_i = code_i * scale

So a cache tensor keeps the shape [num_blocks, block_size, kv_heads, head_dim + 4], only its last
dimension is longer and its dtype is the code's: int8 (`round(x / scale)`, scale = max|x| / 127) or
fp8 (`x / scale` rounded to e4m3 or e5m2, scale = max|x| / the format's largest value). Everything
that moves whole blocks (block tables, prefix caching, copy-on-write) works unchanged, and the
attention kernels learn the format from the tensor: a one-byte dtype and `head_dim + 4` columns.

The scale is per token and per head, computed when the token is written (nothing to calibrate),
which is finer than vLLM's fp8 cache (one scale per tensor or per head, 1.0 unless calibrated). The
price is 4 bytes per row: 36 bytes instead of 128 for a 32-wide fp32 head (3.6x smaller), 132 instead
of 256 for a 128-wide bf16 head (1.9x).
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4   # the fp32 scale stored after each row's codes
# vLLM's names for the cache dtype, and ours ("int8"); "auto" keeps the model's dtype.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
MIN_SCALE = torch.finfo(torch.float32).tiny   # an all-zero row gets this scale, so x / scale stays finite


def code_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The code dtype a `kv_cache_dtype` name stands for; None for "auto" (the model's dtype, unquantized)."""
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


def largest_code(dtype: torch.dtype) -> float:
    """The largest magnitude a code can take: 127 for int8 (symmetric), the largest finite fp8 value."""
    return 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)


def row_width(head_dim: int, dtype: torch.dtype | None) -> int:
    """Elements in the last dimension of a cache tensor of this code dtype (None: unquantized)."""
    return head_dim if dtype is None else head_dim + SCALE_BYTES


def is_quantized(cache: torch.Tensor) -> bool:
    """Whether a cache tensor holds codes and scales (its dtype is one of the code dtypes)."""
    return cache.dtype in CODE_DTYPES


def head_dim_of(cache: torch.Tensor) -> int:
    """The model's head_dim for a cache tensor [..., row_width]."""
    return cache.shape[-1] - SCALE_BYTES if is_quantized(cache) else cache.shape[-1]


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows x [..., head_dim] -> cache rows [..., head_dim + 4] of `dtype`: codes, then the fp32 scale's bytes."""
    x = x.float()
    largest = largest_code(dtype)
    scale = (x.abs().amax(dim=-1, keepdim=True) / largest).clamp_min(MIN_SCALE)
    scaled = (x / scale).clamp(-largest, largest)   # clamp first: e4m3fn has no infinity, past 448 is NaN
    if dtype == torch.int8:   # round half away from zero, as the Triton store does (it has no rint)
        codes = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(dtype)
    else:                     # fp8: the cast rounds to the nearest representable value
        codes = scaled.to(dtype)
    return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], dim=-1).view(dtype)


def split_rows(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a quantized cache [..., head_dim + 4]: codes [..., head_dim] and fp32 scales [..., 1]."""
    d = head_dim_of(cache)
    return cache[..., :d], cache[..., d:].view(torch.float32)


def dequantize_rows(cache: torch.Tensor) -> torch.Tensor:
    """Cache rows -> fp32 values [..., head_dim]; an unquantized cache is returned as it is."""
    if not is_quantized(cache):
        return cache
    codes, scales = split_rows(cache)
    return codes.float() * scales
