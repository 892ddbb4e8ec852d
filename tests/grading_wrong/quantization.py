"""Wrong int4 quantizers and dequantizers, wrong GPTQ blocks, wrong int4 GEMV kernels (defined under the
interpreter: conftest sets TRITON_INTERPRET before this module is imported), and answers that call llminfer's
own quantization code, which the grader switches off."""

import torch
import triton
import triton.language as tl

from llminfer.quant.formats import Int4Weight, int4_codes, pack_int4, quantize_int4, unpack_int4


def _quantize(w, group_size, rounding=torch.round, range_from_zero=True, add_zero=True, low_first=True,
              pack_rows=False):
    """Group-wise asymmetric int4 and packing with one choice changed from the right one (the defaults)."""
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    if range_from_zero:
        low, high = low.clamp(max=0), high.clamp(min=0)
    scales = ((high - low) / 15).clamp_min(1e-12)
    zeros = torch.round(-low / scales).clamp(0, 15)
    shifted = groups / scales[..., None] + (zeros[..., None] if add_zero else 0)
    codes = rounding(shifted).clamp(0, 15).to(torch.uint8).reshape(rows, cols)
    if pack_rows:   # pairs of rows instead of pairs of columns (an odd last row is packed with zeros)
        codes = torch.cat([codes, codes.new_zeros(rows % 2, cols)])
        return codes[0::2] | (codes[1::2] << 4), scales, zeros.to(torch.uint8)
    first, second = (codes[:, 0::2], codes[:, 1::2]) if low_first else (codes[:, 1::2], codes[:, 0::2])
    return first | (second << 4), scales, zeros.to(torch.uint8)


def _dequantize(packed, scales, zeros, group_size, low_first=True, zero_point=True, wrap=False, tiled=False):
    """Unpack and dequantize with one choice changed from the right one (the defaults)."""
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack([low, high] if low_first else [high, low], dim=-1).flatten(-2)
    if tiled:   # group k's scale repeated every `groups` columns instead of over k's own columns
        per_column_scales, per_column_zeros = scales.repeat(1, group_size), zeros.repeat(1, group_size)
    else:
        per_column_scales = scales.repeat_interleave(group_size, dim=1)
        per_column_zeros = zeros.repeat_interleave(group_size, dim=1)
    if not zero_point:
        return codes.float() * per_column_scales
    if wrap:   # uint8 - uint8 wraps around below 0
        return (codes - per_column_zeros).float() * per_column_scales
    return (codes.float() - per_column_zeros.float()) * per_column_scales


def _gptq(w, u, scales, zeros, block_size, divide=True, within_block=True, after_block=True, sign=1.0,
          stale_error=False, codes_of=None):
    """One GPTQ block with one step changed from the right one (the defaults)."""
    w, original = w.clone(), w.clone()
    block, errors = w[:, :block_size], torch.zeros(w.shape[0], block_size, dtype=w.dtype)
    codes = torch.zeros(w.shape[0], block_size, dtype=torch.uint8)
    for i in range(block_size):
        if codes_of:
            codes[:, i] = codes_of(block[:, i], scales, zeros)
        else:
            codes[:, i] = (torch.round(block[:, i] / scales) + zeros.to(w.dtype)).clamp(0, 15).to(torch.uint8)
        error = (original if stale_error else block)[:, i] - (codes[:, i].to(w.dtype) - zeros.to(w.dtype)) * scales
        errors[:, i] = error / u[i, i] if divide else error
        if within_block:
            block[:, i:] -= sign * errors[:, i, None] * u[i, i:block_size]
    if after_block:
        w[:, block_size:] -= sign * errors @ u[:block_size, block_size:]
    return codes, w[:, block_size:]


@triton.jit
def _gemv(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ZERO_POINT: tl.constexpr, LOW_FIRST: tl.constexpr,
          GROUP_PER_TILE: tl.constexpr, UINT8: tl.constexpr):
    """The int4 GEMV with one switch flipped from the right one (ZERO_POINT and LOW_FIRST True, the others False)."""
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < out_features
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, in_features, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        in_cols = cols < in_features
        mask = in_rows[:, None] & in_cols[None, :]
        xs = tl.load(x + token * in_features + cols, mask=in_cols, other=0.0).to(tl.float32)
        bytes_ = tl.load(packed + rows[:, None] * (in_features // 2) + cols[None, :] // 2, mask=mask, other=0)
        if LOW_FIRST:
            shift = (cols[None, :] % 2) * 4
        else:
            shift = (1 - cols[None, :] % 2) * 4
        codes = (bytes_.to(tl.int32) >> shift) & 0xF
        if GROUP_PER_TILE:   # the group of the tile's first column for the whole tile
            group = rows[:, None] * (in_features // GROUP_SIZE) + (start // GROUP_SIZE) + cols[None, :] * 0
        else:
            group = rows[:, None] * (in_features // GROUP_SIZE) + cols[None, :] // GROUP_SIZE
        scale = tl.load(scales + group, mask=mask, other=0.0)
        zero = tl.load(zeros + group, mask=mask, other=0)
        if not ZERO_POINT:
            weights = codes.to(tl.float32) * scale
        elif UINT8:
            weights = (codes.to(tl.uint8) - zero).to(tl.float32) * scale
        else:
            weights = (codes - zero.to(tl.int32)).to(tl.float32) * scale
        acc += tl.sum(weights * xs[None, :], 1)
    tl.store(out + token * out_features + rows, acc.to(out.dtype.element_ty), mask=in_rows)


@triton.jit
def gemv_without_zero_point(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE, BLOCK_N, BLOCK_K,
          False, True, False, False)


@triton.jit
def gemv_nibbles_swapped(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE, BLOCK_N, BLOCK_K,
          True, False, False, False)


@triton.jit
def gemv_one_group_per_tile(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE, BLOCK_N, BLOCK_K,
          True, True, True, False)


@triton.jit
def gemv_uint8_subtraction(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE, BLOCK_N, BLOCK_K,
          True, True, False, True)


def _library_quantize(w, group_size):
    weight = quantize_int4(w, group_size, symmetric=False)
    return pack_int4(weight.codes), weight.scales, weight.zeros


def _library_dequantize(packed, scales, zeros, group_size):
    return Int4Weight(unpack_int4(packed), scales, zeros, group_size).dequantize()


WRONG = {
    "int4_quantize_pack": {
        "truncates instead of rounding": lambda w, g: _quantize(w, g, rounding=torch.trunc),
        "nibbles swapped (code 2i in the high nibble)": lambda w, g: _quantize(w, g, low_first=False),
        "forgets the zero point": lambda w, g: _quantize(w, g, add_zero=False),
        "range [min, max], not widened to include 0": lambda w, g: _quantize(w, g, range_from_zero=False),
        "packs pairs of rows, not of columns": lambda w, g: _quantize(w, g, pack_rows=True),
        "calls llminfer.quant's quantize_int4 and pack_int4": _library_quantize,
    },
    "int4_unpack_dequantize": {
        "nibbles swapped (code 2i from the high nibble)": lambda p, s, z, g: _dequantize(p, s, z, g, low_first=False),
        "forgets the zero point": lambda p, s, z, g: _dequantize(p, s, z, g, zero_point=False),
        "code - zero in uint8 (wraps around)": lambda p, s, z, g: _dequantize(p, s, z, g, wrap=True),
        "scales tiled with repeat, not repeat_interleave": lambda p, s, z, g: _dequantize(p, s, z, g, tiled=True),
        "calls llminfer.quant's Int4Weight.dequantize": _library_dequantize,
    },
    "gptq_block_update": {
        "error not divided by the Cholesky diagonal": lambda w, u, s, z, b: _gptq(w, u, s, z, b, divide=False),
        "no error propagation within the block": lambda w, u, s, z, b: _gptq(w, u, s, z, b, within_block=False),
        "no lazy update of the columns after the block": lambda w, u, s, z, b: _gptq(w, u, s, z, b, after_block=False),
        "adds the compensation instead of subtracting it": lambda w, u, s, z, b: _gptq(w, u, s, z, b, sign=-1.0),
        "the error from the column as it came in, not as updated": lambda w, u, s, z, b: _gptq(
            w, u, s, z, b, stale_error=True),
        "right, but rounds with llminfer.quant's int4_codes": lambda w, u, s, z, b: _gptq(w, u, s, z, b,
                                                                                          codes_of=int4_codes),
    },
    "int4_gemv_triton": {
        "ignores the group's zero point": gemv_without_zero_point,
        "nibbles swapped": gemv_nibbles_swapped,
        "one group per BLOCK_K tile": gemv_one_group_per_tile,
        "code - zero in uint8 (wraps around)": gemv_uint8_subtraction,
    },
}
