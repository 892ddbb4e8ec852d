"""Kernels of Part II, each beside the plain-PyTorch reference it is tested against.

The public functions dispatch: CUDA tensors run the compiled Triton kernel; fp32 CPU tensors run
the C attention kernel of `llminfer.kernels.cpu` when it can be built; anything else the torch
reference. The `*_triton` launchers run the Triton kernels directly (on CPU only under
`TRITON_INTERPRET=1`, which must be set before this package is imported).
"""

from llminfer.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_triton,
    paged_attention_prefill,
    paged_attention_prefill_reference,
    paged_attention_prefill_triton,
)
from llminfer.kernels.store_kv import store_kv, store_kv_triton

__all__ = [
    "paged_attention_decode",
    "paged_attention_decode_reference",
    "paged_attention_decode_triton",
    "paged_attention_prefill",
    "paged_attention_prefill_reference",
    "paged_attention_prefill_triton",
    "store_kv",
    "store_kv_triton",
]
