"""Chapter 18, quantization: group-wise int4 with two codes per byte (quantize and pack; unpack and dequantize),
one block of GPTQ, and a Triton kernel that dequantizes a packed int4 weight inside a matrix-vector product.

The references here are written out on their own, not taken from `llminfer.quant` (GPTQ's as the Optimal Brain
Surgeon updates of the explicit inverse Hessian, not GPTQ's Cholesky rows). While a test runs, llminfer's
quantization code is switched off: an answer that calls it fails, with a message saying which function it called.
"""

from __future__ import annotations

import torch

from llminfer.grading.compare import Mismatch, expect_close, expect_tensor, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading.remote import run_kernel
from llminfer.grading.support import GEMV_BLOCK_K as BLOCK_K
from llminfer.grading.support import GEMV_BLOCK_N as BLOCK_N

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only: the kernel exercise then explains why it cannot run
    triton = tl = None

CHAPTER = "chapters/optimization/18_quantization"
INT4_MAX = 15
LIBRARY = ("llminfer.quant", "llminfer.kernels.quant_matmul")   # switched off while a test runs


# --- group-wise int4: the references --------------------------------------------------------------------------

def int4_scales_zeros(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's asymmetric rule for groups [..., group_size] (fp32 or wider): [min(w, 0), max(w, 0)] onto codes
    0..15, so that 0.0 is exactly a code. Returns scales [...] and zero points uint8 [...]."""
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scales = ((high - low) / INT4_MAX).clamp_min(torch.finfo(torch.float32).tiny)   # an all-zero group: not 0
    zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    return scales, zeros.to(torch.uint8)


def int4_round(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The codes of w: round(w / scale) + zero, clamped to 0..15, as uint8 (scales and zeros broadcast)."""
    return (torch.round(w / scales) + zeros.to(scales.dtype)).clamp(0, INT4_MAX).to(torch.uint8)


def reference_quantize_int4_packed(w: torch.Tensor, group_size: int
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out, in / 2], scales fp32 [out, groups], zeros uint8 [out, groups])."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group_size, group_size)
    scales, zeros = int4_scales_zeros(groups)
    codes = int4_round(groups, scales[..., None], zeros[..., None]).reshape(out_features, in_features)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales, zeros


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, m] -> codes uint8 [out, 2m]: column 2i from the low nibble of byte i, 2i + 1 from the high."""
    codes = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.uint8, device=packed.device)
    codes[:, 0::2], codes[:, 1::2] = packed % 16, packed // 16
    return codes


def reference_dequantize_int4_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                     group_size: int) -> torch.Tensor:
    """(code - zero) * scale of each column's group -> fp32 [out, in]."""
    codes = unpack(packed)
    group = torch.arange(codes.shape[1], device=codes.device) // group_size
    return (codes.float() - zeros[:, group].float()) * scales[:, group].float()


# --- quantize and pack: the tests -------------------------------------------------------------------------------

def _expect_quantized(answer: object, w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """The answer's (packed, scales, zeros), checked for types and shapes."""
    out_features, in_features = w.shape
    if not isinstance(answer, tuple) or len(answer) != 3:
        raise Mismatch(f"the result is a {type(answer).__name__}, expected a tuple (packed, scales, zeros)")
    groups = (out_features, in_features // group_size)
    return (expect_tensor(answer[0], (out_features, in_features // 2), torch.uint8, "packed"),
            expect_tensor(answer[1], groups, torch.float32, "scales"),
            expect_tensor(answer[2], groups, torch.uint8, "zeros"))


def _weight(out_features: int, in_features: int, seed: int, outliers: int = 0) -> torch.Tensor:
    w = torch.randn(out_features, in_features, generator=seeded(seed))
    if outliers:   # a few large values, as real weights have: they set their groups' scales
        w.view(-1)[torch.randperm(w.numel(), generator=seeded(seed + 1))[:outliers]] *= 30
    return w


def _quantize_test(out_features: int, in_features: int, group_size: int, seed: int, parts: str = "all",
                   dtype: torch.dtype = torch.float32, outliers: int = 0):
    """Compare the scales and zero points, or the packed codes, or all three, with the reference's."""
    def run(quantize) -> str:
        w = _weight(out_features, in_features, seed, outliers).to(dtype)
        packed, scales, zeros = _expect_quantized(quantize(w.clone(), group_size), w, group_size)
        want_packed, want_scales, want_zeros = reference_quantize_int4_packed(w, group_size)
        details = []
        if parts in ("all", "scales"):
            details.append(expect_close(scales, want_scales, "scales"))
            expect_close(zeros, want_zeros, "zeros")
        if parts in ("all", "codes"):
            expect_close(unpack(packed), unpack(want_packed), "the codes (unpacked from your bytes)")
            expect_close(packed, want_packed, "packed")
            details.append("codes exact")
        return "; ".join(details)

    return run


def _packing_layout(quantize) -> str:
    """Weights k - 7 for k = 0..15 in one group: scale 1, zero point 7, codes 0..15 in order."""
    w = (torch.arange(16.0) - 7)[None, :]
    packed, scales, zeros = _expect_quantized(quantize(w.clone(), 16), w, 16)
    expected = torch.tensor([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]], dtype=torch.uint8)
    if not torch.equal(packed, expected):
        raise Mismatch(f"weights -7..8 (codes 0..15) packed into bytes {[hex(b) for b in packed[0].tolist()]}, "
                       f"expected {[hex(b) for b in expected[0].tolist()]}: code 2i in the low nibble of byte i")
    return "0x10 0x32 ... 0xfe"


def _one_sign_groups(quantize) -> str:
    """A group of positive weights has zero point 0 (its range starts at 0.0), a negative one 15."""
    w = torch.rand(2, 32, generator=seeded(21)) + 0.5
    w[1] *= -1
    packed, scales, zeros = _expect_quantized(quantize(w.clone(), 32), w, 32)
    if zeros.flatten().tolist() != [0, INT4_MAX]:
        raise Mismatch(f"zero points {zeros.flatten().tolist()} for a positive and a negative group, expected "
                       "[0, 15]: the range of a group is [min(w, 0), max(w, 0)]")
    want_packed, want_scales, _ = reference_quantize_int4_packed(w, 32)
    expect_close(scales, want_scales, "scales (a group's range is [min(w, 0), max(w, 0)])")
    expect_close(unpack(packed), unpack(want_packed), "the codes (unpacked from your bytes)")
    return "zero points 0 and 15, scales max|w| / 15"


def _zero_group(quantize) -> str:
    """An all-zero group: any positive finite scale, and every code equal to the zero point."""
    w = torch.randn(3, 32, generator=seeded(22))
    w[1, :16] = 0
    packed, scales, zeros = _expect_quantized(quantize(w.clone(), 16), w, 16)
    scale, zero, codes = scales[1, 0].item(), zeros[1, 0].item(), unpack(packed)[1, :16]
    if not (0 < scale < float("inf")):
        raise Mismatch(f"the all-zero group got scale {scale}, expected a positive finite scale")
    if not torch.equal(codes, torch.full_like(codes, zero)):
        raise Mismatch(f"the all-zero group's codes are {codes.tolist()}, expected each to be its zero point {zero}")
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[1, 0] = False
    want_packed, want_scales, want_zeros = reference_quantize_int4_packed(w, 16)
    expect_close(scales[keep], want_scales[keep], "the other groups' scales")
    expect_close(zeros[keep], want_zeros[keep], "the other groups' zero points")
    expect_close(packed[[0, 2]], want_packed[[0, 2]], "the other rows' packed codes")
    return f"scale {scale:.3g}, codes = zero point {zero}"


QUANTIZE_TESTS = (
    ExerciseTest("8 x 64 in groups of 32: scales and zero points", 2,
                 _quantize_test(8, 64, 32, seed=11, parts="scales")),
    ExerciseTest("8 x 64 in groups of 32: the packed codes", 2, _quantize_test(8, 64, 32, seed=11, parts="codes")),
    ExerciseTest("packing: code 2i in the low nibble of byte i, 2i + 1 in the high one", 1, _packing_layout),
    ExerciseTest("a positive group has zero point 0, a negative one 15", 1, _one_sign_groups),
    ExerciseTest("an all-zero group: a positive scale, codes equal to the zero point", 1, _zero_group),
    ExerciseTest("5 x 96 in groups of 16", 1, _quantize_test(5, 96, 16, seed=12)),
    ExerciseTest("one group per row: 3 x 96 in groups of 96", 1, _quantize_test(3, 96, 96, seed=13)),
    ExerciseTest("fp16 weights: quantized in fp32", 1, _quantize_test(6, 64, 32, seed=14, dtype=torch.float16),
                 visible=False),
    ExerciseTest("40 x 256 with outliers, groups of 128", 1, _quantize_test(40, 256, 128, seed=15, outliers=6),
                 visible=False),
)


# --- unpack and dequantize: the tests ---------------------------------------------------------------------------

def _random_int4(out_features: int, in_features: int, group_size: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any bytes, any zero points 0..15, scales from 0.01 to 1: packed, scales, zeros."""
    g = seeded(seed)
    groups = in_features // group_size
    packed = torch.randint(0, 256, (out_features, in_features // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_features, groups, generator=g) * 0.99 + 0.01
    zeros = torch.randint(0, INT4_MAX + 1, (out_features, groups), generator=g, dtype=torch.uint8)
    return packed, scales, zeros


def _dequantize_test(out_features: int, in_features: int, group_size: int, seed: int, make=None):
    def run(dequantize) -> str:
        packed, scales, zeros = (make or _random_int4)(out_features, in_features, group_size, seed)
        expected = reference_dequantize_int4_packed(packed, scales, zeros, group_size)
        return expect_close(dequantize(packed.clone(), scales.clone(), zeros.clone(), group_size), expected,
                            "the weight")

    return run


def _every_byte(out_features: int, in_features: int, group_size: int, seed: int):
    """Bytes 0..255 in order, scale 1, zero point 0: the weight is the codes themselves."""
    packed = torch.arange(256, dtype=torch.uint8).reshape(out_features, in_features // 2)
    return packed, torch.ones(out_features, in_features // group_size), torch.zeros(out_features, 1, dtype=torch.uint8)


def _high_zeros(out_features: int, in_features: int, group_size: int, seed: int):
    """Zero points 9..15 above most codes: most weights are negative."""
    packed, scales, _ = _random_int4(out_features, in_features, group_size, seed)
    return packed, scales, torch.randint(9, 16, scales.shape, generator=seeded(seed + 1), dtype=torch.uint8)


def _round_trip(dequantize) -> str:
    """Dequantizing the reference's quantization of w is within half a scale of w."""
    w = _weight(12, 64, seed=31, outliers=2)
    packed, scales, zeros = reference_quantize_int4_packed(w, 16)
    error = (dequantize(packed, scales, zeros, 16) - w).abs()
    bound = scales.repeat_interleave(16, dim=1) / 2 * (1 + 1e-5)
    expect_tensor(error, w.shape, torch.float32, "the weight")
    if (error > bound).any():
        row, col = (error > bound).nonzero()[0].tolist()
        raise Mismatch(f"w[{row}, {col}] = {w[row, col]:.4g} comes back off by {error[row, col]:.3g}, more than half "
                       f"its group's scale {bound[row, col]:.3g}")
    return f"max error {error.max():.2g}, within half a scale"


DEQUANTIZE_TESTS = (
    ExerciseTest("4 x 16 in groups of 8", 2, _dequantize_test(4, 16, 8, seed=41)),
    ExerciseTest("every byte 0..255 (scale 1, zero point 0): the codes in order", 1,
                 _dequantize_test(4, 128, 128, seed=0, make=_every_byte)),
    ExerciseTest("zero points above the codes: negative weights", 1,
                 _dequantize_test(3, 32, 8, seed=42, make=_high_zeros)),
    ExerciseTest("6 groups of 4 in a row: group k covers columns 4k .. 4k + 3", 1, _dequantize_test(5, 24, 4, seed=43)),
    ExerciseTest("round trip: within half a scale of the weight", 1, _round_trip),
    ExerciseTest("7 x 48 as one group per row", 1, _dequantize_test(7, 48, 48, seed=44), visible=False),
    ExerciseTest("64 x 512 in groups of 128", 1, _dequantize_test(64, 512, 128, seed=45), visible=False),
)


# --- one GPTQ block ---------------------------------------------------------------------------------------------

def reference_gptq_quantize_block(w: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                  block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal Brain Surgeon one column at a time, with the inverse Hessian itself: after rounding column j, move
    the columns not yet quantized by -error / Hinv[j, j] * Hinv[j, :], then remove column j from Hinv (its Schur
    complement). GPTQ reads the same updates off the rows of u, the Cholesky factor of Hinv = u.T @ u."""
    w, hinv = w.clone(), u.T @ u
    codes = torch.empty(w.shape[0], block_size, dtype=torch.uint8, device=w.device)
    for j in range(block_size):
        codes[:, j] = int4_round(w[:, j], scales, zeros)
        error = w[:, j] - (codes[:, j].to(w.dtype) - zeros.to(w.dtype)) * scales
        w[:, j:] -= error[:, None] / hinv[j, j] * hinv[j, j:]
        hinv[j:, j:] -= hinv[j:, j, None] * hinv[j, None, j:] / hinv[j, j]
    return codes, w[:, block_size:]


def _gptq_inputs(out_features: int, columns: int, block_size: int, seed: int, identity: bool = False):
    """w [out, columns] in fp64; u, the upper Cholesky factor of the damped inverse Hessian of correlated inputs of
    unequal sizes (so its diagonal is far from 1); and scales and zero points of one group over all the columns,
    chosen (as GPTQ does at a group's first column) from the weights as they come in."""
    g = seeded(seed)
    w = torch.randn(out_features, columns, generator=g, dtype=torch.float64)
    if identity:
        u = torch.eye(columns, dtype=torch.float64)
    else:
        mixing = torch.eye(columns, dtype=torch.float64) + 0.6 * torch.randn(columns, columns, generator=g,
                                                                            dtype=torch.float64)
        sizes = torch.rand(columns, generator=g, dtype=torch.float64) * 3 + 0.3
        x = torch.randn(4 * columns, columns, generator=g, dtype=torch.float64) @ mixing * sizes
        h = 2 * x.T @ x / x.shape[0]
        h += 0.01 * h.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
        u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    scales, zeros = int4_scales_zeros(w)
    return w, u, scales, zeros


def _gptq_test(out_features: int, columns: int, block_size: int, seed: int, identity: bool = False):
    def run(quantize_block) -> str:
        w, u, scales, zeros = _gptq_inputs(out_features, columns, block_size, seed, identity)
        expected_codes, expected_rest = reference_gptq_quantize_block(w, u, scales, zeros, block_size)
        answer = quantize_block(w.clone(), u.clone(), scales.clone(), zeros.clone(), block_size)
        if not isinstance(answer, tuple) or len(answer) != 2:
            raise Mismatch(f"the result is a {type(answer).__name__}, expected a tuple (codes, rest)")
        expect_close(answer[0], expected_codes, "the block's codes")
        return expect_close(answer[1], expected_rest, "the columns after the block")

    return run


GPTQ_TESTS = (
    ExerciseTest("identity Hessian: plain rounding, nothing to compensate", 1,
                 _gptq_test(4, 6, 3, seed=51, identity=True)),
    ExerciseTest("a block of one column: its error spread over the 5 columns after it", 2,
                 _gptq_test(3, 6, 1, seed=52)),
    ExerciseTest("a block of 4 of 12 columns: codes, and the 8 columns after it", 3, _gptq_test(5, 12, 4, seed=53)),
    ExerciseTest("the block is every column: nothing after it", 1, _gptq_test(4, 6, 6, seed=54)),
    ExerciseTest("16 rows, a block of 8 of 24 columns", 2, _gptq_test(16, 24, 8, seed=55), visible=False),
)


# --- the int4 GEMV kernel ---------------------------------------------------------------------------------------

def _reference_kernel(x, packed, scales, zeros, out, out_features, in_features,
                      GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The exercise's solution: BLOCK_N rows of W for one token, BLOCK_K input features at a time, each tile of W
    dequantized in registers and never written to memory."""
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < out_features
    groups_per_row = in_features // GROUP_SIZE
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, in_features, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        in_cols = cols < in_features
        mask = in_rows[:, None] & in_cols[None, :]
        xs = tl.load(x + token * in_features + cols, mask=in_cols, other=0.0).to(tl.float32)
        # Column k's code is in byte k // 2: the low nibble for even k, the high one for odd k. Each byte is
        # loaded twice (once per nibble); the second load hits the cache.
        bytes_ = tl.load(packed + rows[:, None] * (in_features // 2) + cols[None, :] // 2, mask=mask, other=0)
        codes = (bytes_.to(tl.int32) >> ((cols[None, :] % 2) * 4)) & 0xF
        group = rows[:, None] * groups_per_row + cols[None, :] // GROUP_SIZE
        scale = tl.load(scales + group, mask=mask, other=0.0)
        zero = tl.load(zeros + group, mask=mask, other=0).to(tl.int32)   # int32: code - zero may be negative
        acc += tl.sum((codes - zero).to(tl.float32) * scale * xs[None, :], 1)
    tl.store(out + token * out_features + rows, acc.to(out.dtype.element_ty), mask=in_rows)


reference_int4_gemv_kernel = triton.jit(_reference_kernel) if triton is not None else _reference_kernel


def _gemv_test(tokens: int, out_features: int, in_features: int, group_size: int, seed: int,
               dtype: torch.dtype = torch.float32):
    def run(kernel) -> str:
        packed, scales, zeros = _random_int4(out_features, in_features, group_size, seed)
        x = torch.randn(tokens, in_features, generator=seeded(seed + 1)).to(dtype)
        weight = reference_dequantize_int4_packed(packed, scales, zeros, group_size)
        expected = (x.double() @ weight.double().T).to(dtype)
        out = run_kernel(kernel, "int4_gemv", (x, packed, scales, zeros), group_size)
        return expect_close(out, expected, "the output")

    return run


GEMV_TESTS = (
    ExerciseTest("one token, 16 x 64 in groups of 32", 2, _gemv_test(1, 16, 64, 32, seed=71)),
    ExerciseTest("four tokens: one program per token", 1, _gemv_test(4, 16, 64, 32, seed=72)),
    ExerciseTest("13 outputs: not a multiple of BLOCK_N (16)", 1, _gemv_test(2, 13, 64, 16, seed=73)),
    ExerciseTest("80 inputs: not a multiple of BLOCK_K (32)", 1, _gemv_test(1, 16, 80, 16, seed=74)),
    ExerciseTest("groups of 8: four groups in one BLOCK_K tile", 2, _gemv_test(1, 20, 64, 8, seed=75)),
    ExerciseTest("groups of 64: one group over two tiles", 1, _gemv_test(3, 16, 128, 64, seed=76)),
    ExerciseTest("fp16 activations, fp16 output", 1, _gemv_test(2, 24, 96, 32, seed=77, dtype=torch.float16),
                 visible=False),
)


EXERCISES = [
    Exercise("int4_quantize_pack", "group-wise int4: quantize, two codes per byte", CHAPTER, "quantize_int4_packed",
             reference_quantize_int4_packed, QUANTIZE_TESTS, mirrors=LIBRARY),
    Exercise("int4_unpack_dequantize", "group-wise int4: unpack and dequantize", CHAPTER, "dequantize_int4_packed",
             reference_dequantize_int4_packed, DEQUANTIZE_TESTS, mirrors=LIBRARY),
    Exercise("gptq_block_update", "one block of GPTQ: quantize columns, compensate the rest", CHAPTER,
             "gptq_quantize_block", reference_gptq_quantize_block, GPTQ_TESTS, mirrors=LIBRARY),
    # The interpreter runs a kernel ~1000x slower than compiled: give each test more time.
    Exercise("int4_gemv_triton", "a Triton kernel: int4 weights dequantized inside a GEMV", CHAPTER,
             "int4_gemv_kernel", reference_int4_gemv_kernel, GEMV_TESTS, timeout=60.0,
             mirrors=(*LIBRARY, "llminfer.kernels")),
]
