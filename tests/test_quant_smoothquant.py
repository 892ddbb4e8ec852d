"""SmoothQuant: smoothing is exact in float, and W8A8 after smoothing stays close to the float layer on inputs
with outlier channels, much closer than W8A8 without smoothing."""

import pytest
import torch
from quant_helpers import outlier_inputs, small_llama

from llminfer.quant.linear import W8A8Linear
from llminfer.quant.smoothquant import smooth_model, smoothing_scales


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_smoothing_leaves_the_float_model_unchanged(num_kv_heads):
    model = small_llama(num_kv_heads)
    ids = torch.randint(0, 97, (2, 24))
    before, norm = model(ids), model.layers[1].input_layernorm.weight.clone()
    smooth_model(model, torch.randint(0, 97, (4, 32)), alpha=0.5)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.layers[1].input_layernorm.weight, norm)


def test_smoothing_scales_follow_the_formula():
    x, weights = torch.randn(50, 8), [torch.randn(3, 8), torch.randn(5, 8)]
    alpha = 0.7
    x_max = x.abs().amax(dim=0)
    w_max = torch.maximum(weights[0].abs().amax(dim=0), weights[1].abs().amax(dim=0))
    torch.testing.assert_close(smoothing_scales(x, weights, alpha), x_max**alpha / w_max ** (1 - alpha))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_w8a8_after_smoothing_is_close_to_float_on_outlier_inputs():
    x, held_out = outlier_inputs(512, 256, size=50.0, seed=0), outlier_inputs(512, 256, size=50.0, seed=1)
    linear = torch.nn.Linear(256, 96, bias=False)
    scales = smoothing_scales(x, [linear.weight], alpha=0.5)
    plain = W8A8Linear.from_float(linear)
    with torch.no_grad():
        linear.weight.mul_(scales)
    smoothed = W8A8Linear.from_float(linear)
    for inputs in (x, held_out):
        expected = inputs @ (linear.weight / scales).T
        smooth_error = relative_error(smoothed(inputs / scales), expected)
        assert smooth_error < 0.02
        assert smooth_error < 0.3 * relative_error(plain(inputs), expected)


def test_migration_strength_must_lie_in_0_1():
    with pytest.raises(ValueError, match="1.5"):
        smoothing_scales(torch.randn(4, 4), [torch.randn(2, 4)], alpha=1.5)
