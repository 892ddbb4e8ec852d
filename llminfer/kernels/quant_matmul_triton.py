"""GPU matmuls with weight-only quantized weights in Triton: int8 per output channel and group-wise int4.

The weight stays quantized in GPU memory and is dequantized tile by tile in registers, just before it is
multiplied, so a full-precision copy never exists. Decode reads every weight once per step, so moving 1 byte
(int8) or half a byte (int4) per weight instead of 2 is where the speedup comes from.

Two shapes per format, picked by the number of tokens (x [tokens, in] @ W.T, W [out, in] as `nn.Linear`'s):
- GEMV (decode, a few tokens): one program per (token, block of output channels) walks the whole input
  dimension with elementwise products and a sum, no tensor cores: a single row would leave 15 of tl.dot's
  16 rows empty. The programs of the other tokens read the same weight block again, from L2.
- GEMM (prefill, many tokens): one program per tile of tokens x output channels; the dequantized weight
  tile goes through `tl.dot` (tensor cores), so each weight tile is read once per tile of tokens.

Numerics: products are summed in fp32: fp16 keeps 11 significant bits, and a running sum of thousands of
terms in it would round away much of each term.
int8: the one scale per output channel factors out of the sum over inputs, so the loop multiplies x by the raw
codes (exact in fp16 and bf16: |code| <= 127 < 2^8) and each output is scaled once at the end.
int4: scale and zero point change every `group_size` inputs, so each tile is dequantized as
(code - zero) * scale in fp32, inside a single group, and rounded to x's dtype for tl.dot, as the reference
rounds its dequantized weight. Packed layout (`pack_int4`): byte j of a row holds the codes of columns 2j (low
nibble) and 2j + 1 (high nibble).

The references are `int8_weight_matmul_reference` and `int4_weight_matmul_reference` of
`llminfer.kernels.quant_matmul`. On CPU the launchers run only under TRITON_INTERPRET=1 (set before import).
"""

from __future__ import annotations

import torch

from llminfer.kernels.quant_matmul import FLOAT_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the torch references are the only path
    triton = tl = None

jit = triton.jit if triton is not None else lambda fn: fn

# Up to this many tokens the GEMV kernels run, beyond it the GEMM kernels. A guess, not yet measured on a GPU:
# each extra token makes the GEMV re-read the weight from L2, while tl.dot pads a few tokens to 16 rows.
GEMV_MAX_TOKENS = 4
# tl.dot takes tiles of at least 16 along each dimension; an int4 tile of inputs must lie inside one group.
INT4_GROUP_MULTIPLE = 16
# Tile sizes, not tuned on a GPU yet. GEMV: 16 output channels per program, so a 4096-wide layer still gives one
# token 256 programs to spread over the SMs. GEMM: 32 inputs per step keep an fp32 GEMM's pipelined tiles
# (3 stages of x and weight) inside the 64 KB of shared memory of sm_75 (Colab's T4).
GEMV_BLOCK_N, GEMV_BLOCK_K = 16, 128
GEMM_BLOCK_N, GEMM_BLOCK_K = 64, 32


@jit
def _int4_weight_tile(packed, scales, zeros, rows, row_mask, k, group, stride_packed, stride_groups):
    """Columns k [BLOCK_K] of the output channels `rows` [BLOCK_N] (int64), dequantized: fp32 [BLOCK_K, BLOCK_N].
    All of k lies in `group`, so each channel needs one scale and one zero point."""
    # Column k's code sits in byte k // 2, in the low nibble for even k. Neighbouring columns load the same
    # byte from cache, so memory still moves half a byte per weight.
    byte = tl.load(packed + rows[None, :] * stride_packed + (k // 2)[:, None], mask=row_mask[None, :], other=0)
    code = (byte.to(tl.int32) >> ((k % 2) * 4)[:, None]) & 0xF
    scale = tl.load(scales + rows * stride_groups + group, mask=row_mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros + rows * stride_groups + group, mask=row_mask, other=0).to(tl.float32)
    return (code.to(tl.float32) - zero[None, :]) * scale[None, :]


@jit
def _int8_weight_gemv_kernel(x, codes, scales, out, N, K, stride_x, stride_codes, stride_out,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid (output blocks, tokens): out[token, n] for BLOCK_N channels n; those past an odd N are masked off.
    token = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = n.to(tl.int64)   # int64: row * stride passes 2^31 for a large weight (a 128k-vocabulary head)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K   # the last tile of an odd K is partial; masked loads give 0, which adds nothing
        # x's row [BLOCK_K] and the codes transposed, [BLOCK_K, BLOCK_N]; a product and a sum over K.
        x_tile = tl.load(x + token * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
        w_tile = tl.load(codes + rows[None, :] * stride_codes + k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                         other=0).to(tl.float32)
        acc += tl.sum(w_tile * x_tile[:, None], 0)
    scale = tl.load(scales + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out + token * stride_out + n, (acc * scale).to(out.dtype.element_ty), mask=n_mask)


@jit
def _int8_weight_gemm_kernel(x, codes, scales, out, M, N, K, stride_x, stride_codes, stride_out,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    # Grid (token tiles, output tiles): out[m, n] for BLOCK_M tokens x BLOCK_N channels, masked at odd edges.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    tokens, rows = m.to(tl.int64), n.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        # x [BLOCK_M, BLOCK_K] and the codes transposed, [BLOCK_K, BLOCK_N]: tl.dot's two operands.
        x_tile = tl.load(x + tokens[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                         other=0.0)
        w_tile = tl.load(codes + rows[None, :] * stride_codes + k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                         other=0)
        # Codes converted to x's dtype exactly; tl.dot multiplies in it and accumulates in fp32.
        acc += tl.dot(x_tile, w_tile.to(x_tile.dtype), input_precision=DOT_PRECISION)
    scale = tl.load(scales + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out + tokens[:, None] * stride_out + n[None, :], (acc * scale[None, :]).to(out.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@jit
def _int4_weight_gemv_kernel(x, packed, scales, zeros, out, N, K, stride_x, stride_packed, stride_groups,
                             stride_out, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid (output blocks, tokens), as the int8 GEMV. BLOCK_K divides GROUP_SIZE, which divides K: every
    # tile is whole and lies in one group, so only the output channels need a mask.
    token = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = n.to(tl.int64)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(x + token * stride_x + k).to(tl.float32)
        w_tile = _int4_weight_tile(packed, scales, zeros, rows, n_mask, k, k0 // GROUP_SIZE,
                                   stride_packed, stride_groups)
        acc += tl.sum(w_tile * x_tile[:, None], 0)
    tl.store(out + token * stride_out + n, acc.to(out.dtype.element_ty), mask=n_mask)


@jit
def _int4_weight_gemm_kernel(x, packed, scales, zeros, out, M, N, K, stride_x, stride_packed, stride_groups,
                             stride_out, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Grid (token tiles, output tiles), as the int8 GEMM; tiles along K are whole and inside one group.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    tokens, rows = m.to(tl.int64), n.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(x + tokens[:, None] * stride_x + k[None, :], mask=m_mask[:, None], other=0.0)
        w_tile = _int4_weight_tile(packed, scales, zeros, rows, n_mask, k, k0 // GROUP_SIZE,
                                   stride_packed, stride_groups)
        # The fp32 dequantized tile rounded to x's dtype, as the reference rounds its weight; fp32 accumulator.
        acc += tl.dot(x_tile, w_tile.to(x_tile.dtype), input_precision=DOT_PRECISION)
    tl.store(out + tokens[:, None] * stride_out + n[None, :], acc.to(out.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """Dtype names joined by "or", for error messages."""
    return " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


def _check_x(x: torch.Tensor, op: str) -> None:
    """Raise ValueError unless x is a 2-D float tensor [tokens, in]."""
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be [tokens, in] in {_dtype_names(FLOAT_DTYPES)}, "
                         f"got {x.dtype} {tuple(x.shape)}")


def _check_operand(op: str, name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...],
                   shape: tuple[int | None, ...], device: torch.device) -> None:
    """Raise ValueError unless tensor has one of `dtypes`, `shape` (None: any size, named "out") and `device`."""
    fits = (tensor.dim() == len(shape)
            and all(want in (None, got) for want, got in zip(shape, tensor.shape, strict=True)))
    if tensor.dtype not in dtypes or not fits or tensor.device != device:
        expected = ", ".join("out" if size is None else str(size) for size in shape)
        raise ValueError(f"{op}: {name} must be {_dtype_names(dtypes)} [{expected}] on {device}, "
                         f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")


def _use_gemv(tokens: int, gemv: bool | None) -> bool:
    """The caller's choice of kernel, or by default the GEMV for at most GEMV_MAX_TOKENS tokens."""
    return tokens <= GEMV_MAX_TOKENS if gemv is None else gemv


def _dot_precision(x: torch.Tensor) -> str:
    # fp32 dots stay fp32 (not TF32), so fp32 results match the reference to 1e-4.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _gemm_block_m(tokens: int) -> int:
    """Rows of a token tile: tl.dot's minimum of 16, up to 64 for long prompts."""
    return min(64, max(16, triton.next_power_of_2(tokens)))


def int8_weight_matmul_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                              gemv: bool | None = None) -> torch.Tensor:
    """x [tokens, in] @ (codes int8 [out, in] * scales [out, None]).T -> [tokens, out] in x's dtype.

    `gemv` picks the kernel: None takes the GEMV for at most GEMV_MAX_TOKENS tokens, else the GEMM."""
    op = "int8 weight matmul"
    _check_x(x, op)
    _check_operand(op, "codes", codes, (torch.int8,), (None, x.shape[1]), x.device)
    out_features = codes.shape[0]
    _check_operand(op, "scales", scales, FLOAT_DTYPES, (out_features,), x.device)
    x, codes, scales = x.contiguous(), codes.contiguous(), scales.contiguous()
    tokens, in_features = x.shape
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if _use_gemv(tokens, gemv):
        _int8_weight_gemv_kernel[(triton.cdiv(out_features, GEMV_BLOCK_N), tokens)](
            x, codes, scales, out, out_features, in_features, x.stride(0), codes.stride(0), out.stride(0),
            BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K,
        )
    else:
        block_m = _gemm_block_m(tokens)
        _int8_weight_gemm_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(out_features, GEMM_BLOCK_N))](
            x, codes, scales, out, tokens, out_features, in_features, x.stride(0), codes.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=GEMM_BLOCK_N, BLOCK_K=GEMM_BLOCK_K, DOT_PRECISION=_dot_precision(x),
        )
    return out


def int4_weight_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                              group_size: int, gemv: bool | None = None) -> torch.Tensor:
    """x [tokens, in] @ W.T -> [tokens, out] in x's dtype, for the group-wise int4 weight W [out, in] given as
    `pack_int4`'s uint8 [out, in / 2], scales [out, groups] and zero points uint8 [out, groups], each run of
    `group_size` inputs one group (a multiple of 16). `gemv` as for `int8_weight_matmul_triton`."""
    op = "int4 weight matmul"
    _check_x(x, op)
    tokens, in_features = x.shape
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
            or group_size % INT4_GROUP_MULTIPLE or in_features % group_size):
        raise ValueError(f"{op}: group_size must be a positive multiple of {INT4_GROUP_MULTIPLE} that divides "
                         f"in = {in_features}, got {group_size!r}")
    _check_operand(op, "packed", packed, (torch.uint8,), (None, in_features // 2), x.device)
    out_features, groups = packed.shape[0], in_features // group_size
    _check_operand(op, "scales", scales, FLOAT_DTYPES, (out_features, groups), x.device)
    _check_operand(op, "zeros", zeros, (torch.uint8,), (out_features, groups), x.device)
    x, packed, scales, zeros = x.contiguous(), packed.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # The largest power of two dividing group_size (at least 16), so a tile of inputs never spans two groups.
    block_k = group_size & -group_size
    if _use_gemv(tokens, gemv):
        _int4_weight_gemv_kernel[(triton.cdiv(out_features, GEMV_BLOCK_N), tokens)](
            x, packed, scales, zeros, out, out_features, in_features, x.stride(0), packed.stride(0),
            scales.stride(0), out.stride(0), GROUP_SIZE=group_size, BLOCK_N=GEMV_BLOCK_N,
            BLOCK_K=min(block_k, GEMV_BLOCK_K),
        )
    else:
        block_m = _gemm_block_m(tokens)
        _int4_weight_gemm_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(out_features, GEMM_BLOCK_N))](
            x, packed, scales, zeros, out, tokens, out_features, in_features, x.stride(0), packed.stride(0),
            scales.stride(0), out.stride(0), GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=GEMM_BLOCK_N,
            BLOCK_K=min(block_k, GEMM_BLOCK_K), DOT_PRECISION=_dot_precision(x),
        )
    return out


def int8_triton_supported(x: torch.Tensor) -> bool:
    """Whether the Triton int8 kernels take x: CUDA, a float dtype, bf16 only where tl.dot has it (sm_80+)."""
    return (triton is not None and x.is_cuda and x.dtype in FLOAT_DTYPES
            and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) >= (8, 0)))


def int4_triton_supported(x: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton int4 kernels take x and this group size."""
    return int8_triton_supported(x) and group_size % INT4_GROUP_MULTIPLE == 0
