"""torch's CPU kernels for quantized matmuls equal their dequantize-then-matmul references, and every quantized
linear layer's `forward` (fast path where it applies) equals its `forward_reference`, on odd shapes.

The references are independent of the kernels: plain dequantization in fp32 and `F.linear`; for int8 x int8,
an int32 matmul. Tolerances: the kernels sum in another order (fp32) or round outputs to bf16.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from llminfer.kernels.quant_matmul import (
    WEIGHT_ONLY_MAX_TOKENS,
    cpu_kernel_dtype,
    int4_cpu_supported,
    int4_weight_matmul,
    int4_weight_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    int8_matmul_supported,
    int8_weight_matmul,
    int8_weight_matmul_reference,
    int8_weight_supported,
    pack_int4_for_cpu,
)
from llminfer.quant.formats import Int4Weight, quantize_int4, quantize_int8
from llminfer.quant.linear import Fp8Linear, Int4Linear, Int8Linear, W8A8Linear

TOKENS = [1, 3, 17]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Relative to the output's size: these sums have up to 768 terms of size ~10."""
    scale = expected.float().abs().max().clamp_min(1.0)
    assert_close(actual.float() / scale, expected.float() / scale, dtype)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("out_features,in_features", [(5, 13), (1, 3), (48, 256), (768, 256), (7, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_weight_kernel_matches_reference(tokens, out_features, in_features, dtype):
    if dtype == torch.bfloat16 and in_features % 16:
        pytest.skip("the kernel does not take this shape (bf16 needs in % 16 == 0)")
    codes, scales = quantize_int8(torch.randn(out_features, in_features))
    x = torch.randn(tokens, in_features, dtype=dtype)
    close(int8_weight_matmul(x, codes, scales), int8_weight_matmul_reference(x.float(), codes, scales), dtype)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("out_features,in_features,group_size", [(16, 32, 32), (48, 96, 32), (768, 256, 128),
                                                                 (256, 768, 64), (32, 512, 256)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_weight_kernel_matches_reference(tokens, out_features, in_features, group_size, symmetric, dtype):
    q = quantize_int4(torch.randn(out_features, in_features), group_size, symmetric)
    packed, scales_and_zeros = pack_int4_for_cpu(q.codes, q.scales, q.zeros, dtype)
    x = torch.randn(tokens, in_features, dtype=dtype)
    expected = int4_weight_matmul_reference(x.float(), q.codes, q.scales, q.zeros, group_size)
    close(int4_weight_matmul(x, packed, group_size, scales_and_zeros), expected, dtype)
    torch.testing.assert_close(F.linear(x.float(), q.dequantize()), expected)


def test_weight_only_kernels_are_only_used_where_they_apply():
    assert int8_weight_supported(torch.randn(2, 64)) and int8_weight_supported(torch.randn(2, 64, dtype=torch.bfloat16))
    assert int8_weight_supported(torch.randn(2, 13, dtype=torch.float16))
    assert not int8_weight_supported(torch.randn(2, 24, dtype=torch.bfloat16))   # bf16 reads past rows of 24
    assert not int8_weight_supported(torch.randn(2, 24))   # fp32 runs in bf16 (`cpu_kernel_dtype`)
    assert cpu_kernel_dtype(torch.float32) == torch.bfloat16 and cpu_kernel_dtype(torch.float16) == torch.float16
    assert not int8_weight_supported(torch.randn(WEIGHT_ONLY_MAX_TOKENS + 1, 64))
    x = torch.randn(2, 64)
    assert int4_cpu_supported(x, 32, 32)
    assert not int4_cpu_supported(x, 24, 32)       # output channels come in blocks of 16
    assert not int4_cpu_supported(x, 32, 16)       # group sizes 32, 64, 128, 256
    assert not int4_cpu_supported(torch.randn(WEIGHT_ONLY_MAX_TOKENS + 1, 64), 32, 32)   # many tokens: dequantize
    assert int8_matmul_supported(torch.ones(3, 2, dtype=torch.int8))
    assert not int8_matmul_supported(torch.ones(3, 1, dtype=torch.int8))   # torch's _int_mm is wrong for in = 1


@pytest.mark.parametrize("tokens,out_features,in_features", [(1, 768, 256), (3, 7, 13), (17, 256, 768), (256, 5, 2)])
def test_int8_matmul_is_exact(tokens, out_features, in_features):
    a = torch.randint(-127, 128, (tokens, in_features), dtype=torch.int8)
    b = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), int8_matmul_reference(a, b))
    assert torch.equal(int8_matmul_reference(a, b).long(), a.long() @ b.long().T)   # no int32 overflow


def float_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_()
        if bias:
            linear.bias.normal_()
    return linear


LAYERS = {
    "int8": Int8Linear.from_float,
    "int4 g32": lambda linear: Int4Linear.from_float(linear, 32),
    "int4 g32 asym": lambda linear: Int4Linear.from_float(linear, 32, symmetric=False),
    "fp8": Fp8Linear.from_float,
    "w8a8": W8A8Linear.from_float,
}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 17), (1, 300)])   # x [..., in]: decode, prefill
@pytest.mark.parametrize("out_features,in_features,bias", [(48, 128, False), (7, 64, True), (16, 96, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layer_forward_matches_its_reference(kind, shape, out_features, in_features, bias, dtype):
    layer = LAYERS[kind](float_linear(in_features, out_features, bias))
    x = torch.randn(*shape, in_features, dtype=dtype)
    y = layer(x)
    assert y.shape == (*shape, out_features) and y.dtype == dtype
    # The weight-only CPU kernels take fp32 activations rounded to bf16 (`cpu_kernel_dtype`): bf16's tolerance.
    close(y, layer.forward_reference(x), cpu_kernel_dtype(dtype) if kind.startswith("int") else dtype)
    if kind != "w8a8":   # weight-only: the reference is the dequantized weight in an ordinary linear layer
        close(layer.forward_reference(x), F.linear(x.float(), layer.dequantize(), layer.bias), dtype)


def test_act_order_layer_reorders_inputs_for_the_kernel():
    """A GPTQ act-order layer: groups are scattered over the columns (g_idx), which the kernel cannot read
    directly; the layer sorts columns by group and must still compute x W^T."""
    q = quantize_int4(torch.randn(32, 128), 32, symmetric=False)
    order = torch.randperm(128)
    scattered = Int4Weight(q.codes[:, order], q.scales, q.zeros, 32,
                           g_idx=(torch.arange(128) // 32)[order].to(torch.int32))
    layer = Int4Linear(scattered)
    torch.testing.assert_close(layer.dequantize(), q.dequantize()[:, order])
    x = torch.randn(3, 128)
    assert layer._pack_for_cpu(torch.bfloat16)[0] is not None   # the kernel path, with a column order
    close(layer(x), layer.forward_reference(x), torch.bfloat16)   # fp32 activations run in bf16
    close(layer.forward_reference(x), F.linear(x, q.dequantize()[:, order]))


def test_unequal_groups_fall_back_to_the_reference():
    q = quantize_int4(torch.randn(16, 64), 32)
    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[-8:] = 1   # 56 columns in group 0, 8 in group 1
    layer = Int4Linear(Int4Weight(q.codes, q.scales, q.zeros, 32, g_idx))
    x = torch.randn(2, 64)
    assert layer._pack_for_cpu(torch.float32) is None
    close(layer(x), F.linear(x, layer.dequantize()))


def test_int4_layer_stores_half_a_byte_per_weight():
    layer = Int4Linear.from_float(float_linear(256, 768, False), 128)
    groups = 256 // 128
    assert layer.weight_bytes() == 768 * 256 // 2 + 768 * groups * (4 + 1)   # codes, fp32 scales, uint8 zeros
    assert Int8Linear.from_float(float_linear(256, 768, False)).weight_bytes() == 768 * 256 + 768 * 4


def test_loading_a_state_dict_replaces_the_kernel_operands():
    first = Int4Linear.from_float(float_linear(64, 16, False), 32)
    second = Int4Linear.from_float(float_linear(64, 16, False), 32)
    x = torch.randn(1, 64)
    first(x)                                   # caches the kernel's packed weight
    first.load_state_dict(second.state_dict())
    close(first(x), second(x))


@pytest.mark.parametrize("kind", ["int8", "int4 g32"])
def test_fp32_decode_runs_the_weight_only_kernel_on_bf16_activations(kind, monkeypatch):
    import llminfer.quant.linear as linear_module
    seen = []
    name = "int8_weight_matmul" if kind == "int8" else "int4_weight_matmul"
    real = getattr(linear_module, name)
    monkeypatch.setattr(linear_module, name, lambda x, *a: seen.append(x.dtype) or real(x, *a))
    layer = LAYERS[kind](float_linear(64, 32, False))
    x = torch.randn(2, 64)
    y = layer(x)
    assert seen == [torch.bfloat16] and y.dtype == torch.float32
    close(y, layer.forward_reference(x), torch.bfloat16)
