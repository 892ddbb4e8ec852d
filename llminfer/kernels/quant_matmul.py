"""CPU matmuls with quantized operands (torch's own kernels), each beside its plain-PyTorch reference.

torch ships CPU kernels for weight-only int8 (`_weight_int8pack_mm`), group-wise int4
(`_weight_int4pack_mm_for_cpu`) and int8 x int8 -> int32 (`_int_mm`). They are private ops with
shape rules of their own, so each has a `*_supported` check and callers fall back to the reference.
All take a flat batch x [tokens, in] and a weight laid out like `nn.Linear`'s, [out, in].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_CPU_GROUP_SIZES = (32, 64, 128, 256)
INT8_BF16_BLOCK_K = 16
INT4_CPU_BLOCK_N = 16   # the int4 kernel works on blocks of output channels: out must be a multiple of 16
# The weight-only kernels are decode kernels: they re-read the quantized weight for each few rows, so for many
# tokens dequantizing once and running the float GEMM is faster (benchmarks/quant_matmul.py measures where).
WEIGHT_ONLY_MAX_TOKENS = 32


def cpu_kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the weight-only CPU kernels run in for inputs of `dtype`.

    torch 2.13 vectorises them for bf16 and fp16 activations only; for fp32 it runs a scalar loop, measured 10x
    (int8) and 30x (int4) slower than with bf16 activations at 4096 x 4096 on this book's CPU, and slower than
    the fp32 matmul on the unquantized weight. So fp32 activations go in rounded to bf16 (8 significant bits,
    as many as the int8 weight has) and the result comes back in fp32."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def int8_weight_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] @ (codes int8 [out, in] * scales [out, None]).T -> [tokens, out], in x's dtype."""
    return torch._weight_int8pack_mm(x.contiguous(), codes, scales.to(x.dtype))


def int8_weight_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize the int8 weight, then an ordinary matmul."""
    return F.linear(x, (codes.float() * scales[:, None]).to(x.dtype))


def int8_weight_supported(x: torch.Tensor) -> bool:
    """Whether `_weight_int8pack_mm` takes x [tokens, in], in `cpu_kernel_dtype(x.dtype)`, and beats
    dequantize-then-matmul on it."""
    # torch 2.13's bf16 kernel reads past the end of a row unless `in` is a multiple of 16 (wrong outputs,
    # sometimes a crash); fp32 and fp16 take any width.
    return (x.is_cpu and x.dtype in FLOAT_DTYPES and x.shape[0] <= WEIGHT_ONLY_MAX_TOKENS
            and (cpu_kernel_dtype(x.dtype) != torch.bfloat16 or x.shape[1] % INT8_BF16_BLOCK_K == 0))


def int4_cpu_supported(x: torch.Tensor, out_features: int, group_size: int) -> bool:
    """Whether `_weight_int4pack_mm_for_cpu` takes this input, output width and group size, and beats
    dequantize-then-matmul."""
    return (x.is_cpu and x.dtype in FLOAT_DTYPES and x.shape[0] <= WEIGHT_ONLY_MAX_TOKENS
            and group_size in INT4_CPU_GROUP_SIZES and out_features % INT4_CPU_BLOCK_N == 0)


def pack_int4_for_cpu(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's operands: (packed weight, scales_and_zeros [groups, out, 2] in `dtype`).

    codes uint8 [out, in] with contiguous groups; scales and zeros [out, groups]. The packed layout
    interleaves output channels by the CPU's vector width (AVX-512 or AVX2), so it is built on the
    machine that runs it and never saved."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    # The kernel computes (code - 8) * scale + offset; (code - zero) * scale needs offset = (8 - zero) * scale.
    offsets = (8 - zeros.float()) * scales
    scales_and_zeros = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scales_and_zeros


def int4_weight_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                       scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] @ W.T for the int4 weight W packed by `pack_int4_for_cpu` -> [tokens, out]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_and_zeros)


def int4_weight_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                                 zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantize (code - zero) * scale with contiguous groups, then an ordinary matmul."""
    groups = torch.arange(codes.shape[1], device=codes.device) // group_size
    weight = (codes.float() - zeros[:, groups].float()) * scales[:, groups]
    return F.linear(x, weight.to(x.dtype))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [tokens, in] @ b int8 [out, in].T -> int32 [tokens, out], exact (`torch._int_mm`)."""
    return torch._int_mm(a.contiguous(), b.t())


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same product in int32 arithmetic; exact while in < 2^17 (each |a_i * b_i| <= 2^14, sums < 2^31)."""
    return a.to(torch.int32) @ b.to(torch.int32).t()


def int8_matmul_supported(a: torch.Tensor) -> bool:
    """Whether `_int_mm` gives the exact product for a [tokens, in]: torch 2.13 returns garbage for in = 1."""
    return a.is_cpu and a.shape[1] > 1
