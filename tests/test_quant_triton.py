"""The Triton dequantize-and-multiply kernels (int8 per channel, group-wise int4; GEMV and GEMM) equal their
torch references, and the quantized layers use them on CUDA.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the shapes are tiny
and odd: 1, 3 and 17 tokens, 5 and 33 output channels (partial tiles), an input width of 67 for int8 (a partial
tile along K), group sizes 32, 48 (not a power of two), 64 and 128. fp32 and fp16 there; bf16 on a GPU.
"""

import pytest
import torch
from conftest import assert_close

from llminfer.kernels import quant_matmul_triton
from llminfer.kernels.quant_matmul import int4_weight_matmul_reference, int8_weight_matmul_reference
from llminfer.kernels.quant_matmul_triton import (
    GEMV_MAX_TOKENS,
    int4_weight_matmul_triton,
    int8_weight_matmul_triton,
)
from llminfer.quant.formats import Int4Weight, pack_int4, quantize_int4, quantize_int8
from llminfer.quant.linear import Int4Linear, Int8Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
TOKENS = [1, 3, 17]
KERNELS = {"gemv": True, "gemm": False}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the output's size: these sums have up to 4096 terms of size ~10."""
    scale = expected.float().abs().max().clamp_min(1.0)
    assert_close(actual.float() / scale, expected.float() / scale, dtype)


def int4_operands(out_features: int, in_features: int, group_size: int, device: str = DEVICE):
    """Asymmetric int4 (zero points vary), packed as the layer stores it; also the unpacked codes."""
    q = quantize_int4(torch.randn(out_features, in_features), group_size, symmetric=False)
    return q, [t.to(device) for t in (pack_int4(q.codes), q.scales, q.zeros)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_features,in_features", [(5, 64), (33, 67)])
@pytest.mark.parametrize("tokens", TOKENS)
def test_int8_kernels_match_reference(tokens, out_features, in_features, dtype, kernel):
    codes, scales = quantize_int8(torch.randn(out_features, in_features))
    x = torch.randn(tokens, in_features, dtype=dtype)
    expected = int8_weight_matmul_reference(x.float(), codes, scales)
    y = int8_weight_matmul_triton(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), gemv=KERNELS[kernel])
    assert y.shape == (tokens, out_features) and y.dtype == dtype
    close(y.cpu(), expected, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_features,in_features,group_size", [(5, 64, 32), (33, 96, 32), (7, 96, 48),
                                                                 (3, 128, 64), (5, 256, 128)])
@pytest.mark.parametrize("tokens", TOKENS)
def test_int4_kernels_match_reference(tokens, out_features, in_features, group_size, dtype, kernel):
    q, operands = int4_operands(out_features, in_features, group_size)
    x = torch.randn(tokens, in_features, dtype=dtype)
    expected = int4_weight_matmul_reference(x.float(), q.codes, q.scales, q.zeros, group_size)
    y = int4_weight_matmul_triton(x.to(DEVICE), *operands, group_size, gemv=KERNELS[kernel])
    assert y.shape == (tokens, out_features) and y.dtype == dtype
    close(y.cpu(), expected, dtype)


class Launches:
    """Stands in for a kernel (`kernel[grid](...)`) and records that it was launched."""

    def __init__(self):
        self.count = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
        return launch


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_few_tokens_take_the_gemv_and_many_the_gemm(monkeypatch, fmt):
    gemv, gemm = Launches(), Launches()
    monkeypatch.setattr(quant_matmul_triton, f"_{fmt}_weight_gemv_kernel", gemv)
    monkeypatch.setattr(quant_matmul_triton, f"_{fmt}_weight_gemm_kernel", gemm)
    for tokens in (1, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1):
        x = torch.randn(tokens, 64)
        if fmt == "int8":
            int8_weight_matmul_triton(x, *quantize_int8(torch.randn(5, 64)))
        else:
            int4_weight_matmul_triton(x, *int4_operands(5, 64, 32, "cpu")[1], 32)
    assert (gemv.count, gemm.count) == (2, 1)


def test_empty_inputs_give_empty_outputs():
    codes, scales = quantize_int8(torch.randn(5, 64))
    assert int8_weight_matmul_triton(torch.randn(0, 64), codes, scales).shape == (0, 5)
    _, operands = int4_operands(5, 64, 32, "cpu")
    assert int4_weight_matmul_triton(torch.randn(0, 64), *operands, 32).shape == (0, 5)


def test_act_order_layer_gives_the_kernel_columns_sorted_by_group():
    """Int4Linear's Triton operands for a GPTQ act-order weight (groups scattered over the columns): x's columns
    in the layer's order times the re-packed codes is x W^T."""
    q = quantize_int4(torch.randn(5, 96), 32, symmetric=False)
    order = torch.randperm(96)
    layer = Int4Linear(Int4Weight(q.codes[:, order], q.scales, q.zeros, 32,
                                  g_idx=(torch.arange(96) // 32)[order].to(torch.int32)))
    column_order, packed = layer._pack_for_triton()
    x = torch.randn(3, 96)
    y = int4_weight_matmul_triton(x[:, column_order], packed, layer.scales, layer.zeros, 32, gemv=True)
    close(y, layer.forward_reference(x), torch.float32)
    plain = Int4Linear(q)
    column_order, packed = plain._pack_for_triton()
    assert column_order is None and packed is plain.qweight   # no act-order: the stored codes, no copy


def test_bad_inputs_are_refused():
    x = torch.randn(3, 64)
    codes, scales = quantize_int8(torch.randn(5, 64))
    for args, message in [((x[0], codes, scales), r"x must be \[tokens, in\]"),
                          ((x.long(), codes, scales), "x must be"),
                          ((x, codes[:, :32], scales), r"codes must be int8 \[out, 64\]"),
                          ((x, codes.float(), scales), "codes must be int8"),
                          ((x, codes, scales[:4]), r"scales must be .* \[5\]")]:
        with pytest.raises(ValueError, match=message):
            int8_weight_matmul_triton(*args)
    packed, scales, zeros = int4_operands(5, 64, 32, "cpu")[1]
    for args, message in [((x, packed, scales, zeros, 24), "group_size must be a positive multiple of 16"),
                          ((x, packed, scales, zeros, 48), "divides in = 64"),
                          ((x, packed, scales, zeros, 0), "group_size"),
                          ((x, packed, scales, zeros, 32.0), "group_size"),
                          ((x, packed.to(torch.int8), scales, zeros, 32), "packed must be uint8"),
                          ((x, packed[:, :16], scales, zeros, 32), r"packed must be uint8 \[out, 32\]"),
                          ((x, packed, scales[:, :1], zeros, 32), r"scales must be .* \[5, 2\]"),
                          ((x, packed, scales, zeros.to(torch.int32), 32), "zeros must be uint8"),
                          ((x.to(torch.int8), packed, scales, zeros, 32), "x must be")]:
        with pytest.raises(ValueError, match=message):
            int4_weight_matmul_triton(*args)


# On a GPU: compiled kernels at model-like sizes in fp16 and bf16, and the layers dispatching to them.
GPU_DTYPES = [torch.float16, torch.bfloat16]


def skip_bf16_before_ampere(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tl.dot has no bf16 before sm_80 (a T4 is sm_75)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1, 300])
def test_gpu_kernels_at_model_sizes(tokens, dtype):
    skip_bf16_before_ampere(dtype)
    x = torch.randn(tokens, 4096, dtype=dtype, device="cuda")
    codes, scales = quantize_int8(torch.randn(11008, 4096, device="cuda"))
    close(int8_weight_matmul_triton(x, codes, scales), int8_weight_matmul_reference(x.float(), codes, scales), dtype)
    q = quantize_int4(torch.randn(11008, 4096, device="cuda"), 128, symmetric=False)
    close(int4_weight_matmul_triton(x, pack_int4(q.codes), q.scales, q.zeros, 128),
          int4_weight_matmul_reference(x.float(), q.codes, q.scales, q.zeros, 128), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gpu_layers_use_the_kernels(monkeypatch, act_order, dtype):
    skip_bf16_before_ampere(dtype)
    linear = torch.nn.Linear(256, 77, bias=True)
    layers = [Int8Linear.from_float(linear), Int4Linear.from_float(linear, 64, symmetric=False)]
    if act_order:
        q = layers[1].int4_weight()
        layers[1] = Int4Linear(Int4Weight(q.codes.flip(1), q.scales, q.zeros, 64,
                                          g_idx=(torch.arange(256).flip(0) // 64).to(torch.int32)), linear.bias)
    calls = []
    for name in ("int8_weight_matmul_triton", "int4_weight_matmul_triton"):
        kernel = getattr(quant_matmul_triton, name)
        monkeypatch.setattr(f"llminfer.quant.linear.{name}",
                            lambda *args, kernel=kernel, **kwargs: calls.append(kernel) or kernel(*args, **kwargs))
    for layer in layers:
        layer.cuda()
        for shape in [(1, 256), (2, 9, 256)]:   # decode, prefill
            x = torch.randn(*shape, dtype=dtype, device="cuda")
            close(layer(x), layer.forward_reference(x), dtype)
    assert len(calls) == 4
