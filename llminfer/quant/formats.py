"""Number formats for quantized weights and activations: int8, group-wise int4, fp8, and int4 packing.

Every quantizer here rounds to nearest (RTN): code = round(w / scale) (+ zero point), clamped to the
format's range, and dequantization is (code - zero) * scale, so each element is off by at most scale / 2.
GPTQ and AWQ change *which* values get rounded (or scale the weight first); they store the same formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_MAX = 127           # symmetric int8 uses -127..127, so that -x is representable whenever x is
INT4_MAX = 15            # int4 codes are unsigned, 0..15; the zero point says which code means 0.0
INT4_SYMMETRIC_ZERO = 8  # symmetric int4 (GPTQ's convention): codes 0..15 mean -8..7 scales
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# The smallest scale: an all-zero row or group gets this instead of 0, so that w / scale stays finite.
MIN_SCALE = torch.finfo(torch.float32).tiny


def as_float(w: torch.Tensor) -> torch.Tensor:
    """w detached, in fp32 or wider: fp64 stays fp64, so that GPTQ can be checked in exact-enough arithmetic."""
    return w.detach().to(torch.promote_types(w.dtype, torch.float32))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row: w [rows, cols] -> (codes int8 [rows, cols], scales fp32 [rows]).

    For a weight [out, in] a row is an output channel; for activations [tokens, in] it is a token."""
    scales = (w.detach().abs().amax(dim=-1).float() / INT8_MAX).clamp_min(MIN_SCALE)
    codes = torch.round(w.float() / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes int8 [rows, cols] * scales [rows] -> fp32 [rows, cols]."""
    return codes.float() * scales[:, None]


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    """Raise ValueError unless `group_size` is a positive divisor of `in_features`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {in_features} of {name}")


@dataclass
class Int4Weight:
    """A weight [out, in] in group-wise int4: each run of `group_size` input columns of a row shares
    one scale and one zero point. With act-order (GPTQ), `g_idx[k]` names column k's group instead."""

    codes: torch.Tensor          # uint8 [out, in], values 0..15 (unpacked; `pack_int4` halves it)
    scales: torch.Tensor         # fp32 [out, in // group_size]
    zeros: torch.Tensor          # uint8 [out, in // group_size], the code that means 0.0
    group_size: int
    g_idx: torch.Tensor | None = None  # int32 [in]; None means column k is in group k // group_size

    def group_index(self) -> torch.Tensor:
        """Group of each input column, [in]."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] these codes stand for: (code - zero) * scale of the column's group."""
        if self.g_idx is None:   # contiguous groups: broadcast each group's scale over its columns
            out_features, in_features = self.codes.shape
            codes = self.codes.reshape(out_features, -1, self.group_size).to(self.scales.dtype)
            weight = (codes - self.zeros[..., None].to(self.scales.dtype)) * self.scales[..., None]
            return weight.reshape(out_features, in_features)
        g = self.group_index()
        return (self.codes.to(self.scales.dtype) - self.zeros[:, g].to(self.scales.dtype)) * self.scales[:, g]


def int4_scales_zeros(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w [..., group] (GPTQ's rule), both shaped [...].

    Asymmetric: [min(w, 0), max(w, 0)] maps onto codes 0..15 (0.0 stays exact). Symmetric:
    [-absmax, absmax] with zero point 8 everywhere, so no zero point needs storing."""
    w = as_float(w)
    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    if symmetric:
        high = torch.maximum(-low, high)
        low = -high
    scales = ((high - low) / INT4_MAX).clamp_min(MIN_SCALE)
    if symmetric:
        zeros = torch.full_like(scales, INT4_SYMMETRIC_ZERO)
    else:
        zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    return scales, zeros.to(torch.uint8)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round w to int4 codes with the given scales and zero points (broadcast against w), uint8."""
    return (torch.round(as_float(w) / scales) + zeros.to(scales.dtype)).clamp(0, INT4_MAX).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = True) -> Int4Weight:
    """Group-wise int4 by rounding to nearest: w [out, in] -> `Int4Weight` (groups along `in`)."""
    out_features, in_features = w.shape
    check_group_size(in_features, group_size)
    groups = as_float(w).reshape(out_features, in_features // group_size, group_size)
    scales, zeros = int4_scales_zeros(groups, symmetric)
    codes = int4_codes(groups, scales[..., None], zeros[..., None]).reshape(out_features, in_features)
    return Int4Weight(codes, scales, zeros, group_size)


def quantize_fp8(w: torch.Tensor, fmt: str = "e4m3", per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 with one scale per tensor ([]) or per row ([rows]): w [rows, cols] -> (fp8 [rows, cols], fp32 scales).

    The scale maps the largest |w| onto the format's largest finite value (448 for e4m3, 57344 for e5m2)."""
    if fmt not in FP8_DTYPES:
        raise ValueError(f"unknown fp8 format {fmt!r}; choose one of {', '.join(FP8_DTYPES)}")
    dtype = FP8_DTYPES[fmt]
    largest = torch.finfo(dtype).max
    absmax = w.detach().abs().amax(dim=-1) if per_channel else w.detach().abs().amax()
    scales = (absmax.float() / largest).clamp_min(MIN_SCALE)
    # Clamp first: e4m3fn has no infinity, and a value just past 448 would round to NaN.
    scaled = (w.float() / (scales[:, None] if per_channel else scales)).clamp(-largest, largest)
    return scaled.to(dtype), scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 [rows, cols] times a per-tensor [] or per-row [rows] scale -> fp32 [rows, cols]."""
    return values.float() * (scales[:, None] if scales.dim() == 1 else scales)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two int4 codes per byte along the last dim: uint8 [..., n] -> [..., n / 2]; code 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of int4 codes into bytes")
    if codes.numel() and (codes.min() < 0 or codes.max() > INT4_MAX):
        raise ValueError(f"int4 codes must lie in 0..{INT4_MAX}, got {codes.min().item()}..{codes.max().item()}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., m] -> codes uint8 [..., 2m]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
