"""Number formats: round-to-nearest error bounds in closed form, exact int4 packing, clear errors.

RTN rounds w / scale to the nearest code, so |w - dequantize(quantize(w))| <= scale / 2 for every element
(up to float rounding of the division). fp8 keeps a relative error of 2^-(mantissa bits + 1) for normal
numbers and half a subnormal step below them.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llminfer.quant.formats import (
    FP8_DTYPES,
    INT4_SYMMETRIC_ZERO,
    dequantize_fp8,
    dequantize_int8,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

SHAPES = [(1, 1), (5, 123), (64, 256), (3, 768)]
SLACK = 1 + 1e-5   # float rounding of w / scale on top of the exact bound


def weight(shape, outliers: bool = True) -> torch.Tensor:
    w = torch.randn(*shape)
    if outliers and w.numel() > 4:
        w.view(-1)[torch.randperm(w.numel())[:3]] *= 50   # a few large values set some rows' scales
    return w


def assert_within(error: torch.Tensor, bound: torch.Tensor) -> None:
    bad = error > bound
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{bad.sum()} elements exceed the bound; first at {index}: error {error[index]:.3g} "
                             f"> bound {bound[index]:.3g}")


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_is_at_most_half_a_scale(shape):
    w = weight(shape)
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (shape[0],)
    assert codes.abs().max() <= 127
    assert_within((w - dequantize_int8(codes, scales)).abs(), scales[:, None] / 2 * SLACK)
    # each row's largest |w| is exactly a code (+-127), so the scale is as small as it can be
    torch.testing.assert_close(codes.abs().amax(dim=1).float(), torch.full((shape[0],), 127.0))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,group_size", [((1, 32), 32), ((5, 96), 32), ((7, 192), 64), ((3, 768), 128),
                                              ((64, 256), 128), ((2, 48), 16)])
def test_int4_error_is_at_most_half_a_scale(shape, group_size, symmetric):
    w = weight(shape)
    q = quantize_int4(w, group_size, symmetric)
    groups = shape[1] // group_size
    assert q.codes.shape == shape and q.scales.shape == q.zeros.shape == (shape[0], groups)
    assert q.codes.dtype == q.zeros.dtype == torch.uint8 and q.codes.max() <= 15
    if symmetric:
        assert (q.zeros == INT4_SYMMETRIC_ZERO).all()
    per_element_scale = q.scales.repeat_interleave(group_size, dim=1)
    assert_within((w - q.dequantize()).abs(), per_element_scale / 2 * SLACK)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_scale_is_set_by_each_group_alone(symmetric):
    """A huge value in one group must not coarsen the others (a per-row scale would)."""
    w = torch.randn(4, 128)
    w[:, 0] = 1000.0
    q = quantize_int4(w, 32, symmetric)
    error = (w - q.dequantize()).abs()
    assert error[:, 32:].max() < 0.5   # about 2 * 3 / 15 / 2 for Gaussian groups, not 1000 / 15


def test_asymmetric_int4_uses_all_codes_for_a_one_sided_group():
    """Positive-only weights: asymmetric spends all 16 codes on [0, max], symmetric only half of them."""
    w = torch.rand(8, 64) + 0.5
    asym, sym = quantize_int4(w, 64, symmetric=False), quantize_int4(w, 64, symmetric=True)
    assert (w - asym.dequantize()).abs().mean() < 0.6 * (w - sym.dequantize()).abs().mean()


def test_zero_weights_quantize_exactly():
    for symmetric in (True, False):
        assert torch.equal(quantize_int4(torch.zeros(3, 64), 32, symmetric).dequantize(), torch.zeros(3, 64))
    codes, scales = quantize_int8(torch.zeros(2, 5))
    assert torch.equal(dequantize_int8(codes, scales), torch.zeros(2, 5))


@pytest.mark.parametrize("in_features,group_size", [(100, 32), (96, 64), (48, 0), (48, -16)])
def test_a_group_size_that_does_not_divide_the_input_is_refused(in_features, group_size):
    with pytest.raises(ValueError, match=str(group_size)) as info:
        quantize_int4(torch.randn(4, in_features), group_size)
    if group_size > 0:
        assert str(in_features) in str(info.value)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("fmt,mantissa_bits,min_exponent", [("e4m3", 3, -6), ("e5m2", 2, -14)])
def test_fp8_error_is_within_half_an_ulp(fmt, mantissa_bits, min_exponent, per_channel):
    w = weight((16, 123))
    values, scales = quantize_fp8(w, fmt, per_channel)
    assert values.dtype == FP8_DTYPES[fmt] and scales.shape == ((16,) if per_channel else ())
    scale = (scales[:, None] if per_channel else scales).expand_as(w)
    # In the scaled domain: relative error 2^-(m+1) for normal numbers, half the subnormal step below them.
    subnormal_step = 2.0 ** (min_exponent - mantissa_bits)
    bound = torch.maximum(w.abs() * 2.0 ** -(mantissa_bits + 1), scale * subnormal_step / 2) * SLACK
    assert_within((w - dequantize_fp8(values, scales)).abs(), bound)
    assert torch.isfinite(dequantize_fp8(values, scales)).all()
    largest = (w.abs().amax(dim=1) if per_channel else w.abs().amax())
    torch.testing.assert_close(dequantize_fp8(values, scales).abs().amax(dim=1 if per_channel else None), largest)


def test_fp8_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="e3m4"):
        quantize_fp8(torch.randn(2, 2), "e3m4")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=0, max_size=64).filter(lambda v: len(v) % 2 == 0),
       st.integers(1, 3))
def test_pack_unpack_int4_round_trips_exactly(values, rows):
    codes = torch.tensor(values * rows, dtype=torch.uint8).reshape(rows, len(values))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, len(values) // 2)
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_int4_layout_is_low_nibble_first():
    assert pack_int4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]


def test_packing_refuses_odd_lengths_and_out_of_range_codes():
    with pytest.raises(ValueError, match="odd number \\(5\\)"):
        pack_int4(torch.zeros(2, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))

