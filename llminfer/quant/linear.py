"""Layers that replace `nn.Linear`: the weight stored in a quantized format, multiplied by a fast kernel.

One class per scheme, as gpt-fast's quantization handlers: `Int8Linear` and `Int4Linear` (weight-only),
`Fp8Linear` (weight-only), `W8A8Linear` (int8 weights and int8 activations). Each runs a kernel where it
applies (`forward`: Triton on CUDA for int8 and int4, torch's CPU kernels on CPU) and otherwise, or when
asked, the plain `forward_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llminfer.kernels.quant_matmul import (
    cpu_kernel_dtype,
    int4_cpu_supported,
    int4_weight_matmul,
    int8_matmul,
    int8_matmul_reference,
    int8_matmul_supported,
    int8_weight_matmul,
    int8_weight_supported,
    pack_int4_for_cpu,
)
from llminfer.kernels.quant_matmul_triton import (
    int4_triton_supported,
    int4_weight_matmul_triton,
    int8_triton_supported,
    int8_weight_matmul_triton,
)
from llminfer.quant.formats import (
    Int4Weight,
    dequantize_fp8,
    dequantize_int8,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


class QuantLinear(nn.Module):
    """Base class: y = x W^T + b for x [..., in], with W [out, in] kept in a quantized format."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] this layer stands for."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        """x [tokens, in] -> [tokens, out]; `fast` allows a kernel, else the reference: dequantize, then matmul."""
        return F.linear(x, self.dequantize().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, fast=True)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, fast=False)

    def _linear(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features), fast).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self) -> int:
        """Bytes this layer stores (codes, scales, zero points, bias): what its weight costs in memory."""
        return sum(t.numel() * t.element_size() for t in [*self.buffers(), *self.parameters()])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """Weight-only int8, one scale per output channel; activations stay in floating point."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(codes.shape[1], codes.shape[0], bias)
        self.register_buffer("weight", codes)    # int8 [out, in]
        self.register_buffer("scales", scales)   # fp32 [out]

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """Round to nearest (RTN)."""
        return cls(*quantize_int8(linear.weight), linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)

    def matmul(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        if fast and int8_triton_supported(x):
            return int8_weight_matmul_triton(x, self.weight, self.scales)
        if fast and int8_weight_supported(x):
            return int8_weight_matmul(x.to(cpu_kernel_dtype(x.dtype)), self.weight, self.scales).to(x.dtype)
        return super().matmul(x, fast)


class Int4Linear(QuantLinear):
    """Weight-only group-wise int4: two codes per byte, a scale and a zero point per group of inputs."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        super().__init__(weight.codes.shape[1], weight.codes.shape[0], bias)
        self.group_size = weight.group_size
        self.register_buffer("qweight", pack_int4(weight.codes))   # uint8 [out, in / 2]
        self.register_buffer("scales", weight.scales)             # fp32 [out, groups]
        self.register_buffer("zeros", weight.zeros)               # uint8 [out, groups]
        self.register_buffer("g_idx", weight.g_idx)               # int32 [in] with act-order, else None
        # The CPU kernel's own copy of the codes, per input dtype, made on first use: its layout depends on the
        # CPU's vector width, so it is never saved. While in use it doubles the codes' bytes in memory.
        self._cpu_operands: dict[torch.dtype, tuple | None] = {}
        # The Triton kernels read `qweight` itself; only act-order needs a copy sorted by group, per device.
        self._triton_operands: dict[torch.device, tuple | None] = {}

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, symmetric: bool = True) -> Int4Linear:
        """Round to nearest (RTN)."""
        return cls(quantize_int4(linear.weight, group_size, symmetric), linear.bias)

    def int4_weight(self) -> Int4Weight:
        return Int4Weight(unpack_int4(self.qweight), self.scales, self.zeros, self.group_size, self.g_idx)

    def dequantize(self) -> torch.Tensor:
        return self.int4_weight().dequantize()

    def matmul(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        if fast and int4_triton_supported(x, self.group_size):
            operands = self._pack_for_triton()
            if operands is not None:
                order, packed = operands
                x = x if order is None else x[:, order]
                return int4_weight_matmul_triton(x, packed, self.scales, self.zeros, self.group_size)
        if fast and int4_cpu_supported(x, self.out_features, self.group_size):
            dtype = cpu_kernel_dtype(x.dtype)
            if dtype not in self._cpu_operands:
                self._cpu_operands[dtype] = self._pack_for_cpu(dtype)
            operands = self._cpu_operands[dtype]
            if operands is not None:
                order, packed, scales_and_zeros = operands
                x_in = (x if order is None else x[:, order]).to(dtype)
                return int4_weight_matmul(x_in, packed, self.group_size, scales_and_zeros).to(x.dtype)
        return super().matmul(x, fast)

    def _codes_by_group(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(column order, codes [out, in] in that order) with each group's columns side by side, as the kernels
        need; order None when they already are. With act-order they are not, so the columns (and x's, at run
        time) are sorted by group. None for groups of unequal sizes: only the reference can multiply."""
        codes, order = unpack_int4(self.qweight), None
        if self.g_idx is not None:
            order = torch.argsort(self.g_idx, stable=True)
            columns = torch.arange(self.in_features, device=order.device)
            if not torch.equal(self.g_idx[order].long(), columns // self.group_size):
                return None
            codes = codes[:, order]
            if torch.equal(order, columns):
                order = None   # the groups are already contiguous
        return order, codes

    def _pack_for_cpu(self, dtype: torch.dtype) -> tuple | None:
        """The CPU kernel's operands (order, packed weight, scales_and_zeros), or None if it cannot take this weight."""
        by_group = self._codes_by_group()
        if by_group is None:
            return None
        order, codes = by_group
        return order, *pack_int4_for_cpu(codes, self.scales, self.zeros, dtype)

    def _pack_for_triton(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """The Triton kernels' (column order, packed codes), or None if they cannot take this weight. Without
        act-order that is `qweight` as stored; with it, codes sorted by group and packed again, made once."""
        if self.g_idx is None:
            return None, self.qweight
        device = self.qweight.device
        if device not in self._triton_operands:
            by_group = self._codes_by_group()
            self._triton_operands[device] = None if by_group is None else (by_group[0], pack_int4(by_group[1]))
        return self._triton_operands[device]

    def _load_from_state_dict(self, *args, **kwargs):
        self._cpu_operands.clear()   # the cached kernel operands belong to the old codes
        self._triton_operands.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, act_order={self.g_idx is not None}"


class Fp8Linear(QuantLinear):
    """Weight-only fp8 (e4m3 or e5m2) with one scale per output channel. There is no fp8 matmul on CPU,
    so it always dequantizes; on GPUs with fp8 tensor cores `torch._scaled_mm` would multiply directly."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(values.shape[1], values.shape[0], bias)
        self.register_buffer("weight", values)   # fp8 [out, in]
        self.register_buffer("scales", scales)   # fp32 [out]

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str = "e4m3") -> Fp8Linear:
        return cls(*quantize_fp8(linear.weight, fmt, per_channel=True), linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scales)


class W8A8Linear(QuantLinear):
    """int8 weights (per output channel) times int8 activations (per token, quantized at run time),
    accumulated exactly in int32 and rescaled: y[t, o] = sum_i qx[t, i] qw[o, i] * sx[t] * sw[o]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(codes.shape[1], codes.shape[0], bias)
        self.register_buffer("weight", codes)    # int8 [out, in]
        self.register_buffer("scales", scales)   # fp32 [out]

    @classmethod
    def from_float(cls, linear: nn.Linear) -> W8A8Linear:
        return cls(*quantize_int8(linear.weight), linear.bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)

    def matmul(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        x_codes, x_scales = quantize_int8(x)
        if fast and int8_matmul_supported(x_codes):
            acc = int8_matmul(x_codes, self.weight)
        else:
            acc = int8_matmul_reference(x_codes, self.weight)
        return (acc.float() * x_scales[:, None] * self.scales).to(x.dtype)
