"""AWQ and the scale folding it shares with SmoothQuant: folding leaves the float model's function unchanged,
and AWQ's searched scales give lower int4 output error than round-to-nearest where some inputs are large."""

import pytest
import torch
from quant_helpers import outlier_inputs, small_llama

from llminfer.quant.awq import awq_scale_model, awq_scales
from llminfer.quant.formats import quantize_int4
from llminfer.quant.scaling import apply_scales, scale_groups

FLOAT = {"rtol": 1e-5, "atol": 1e-5}


def ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_kv_heads,qkv_bias", [(4, False), (2, False), (4, True)])
def test_folding_any_positive_scales_leaves_the_model_unchanged(num_kv_heads, qkv_bias):
    model = small_llama(num_kv_heads, qkv_bias)
    before = model(ids())
    for layer in model.layers:
        for group in scale_groups(layer):
            in_features = next(iter(group.linears.values())).in_features
            apply_scales(group, torch.exp(torch.randn(in_features)))   # scales from ~0.1 to ~10
    torch.testing.assert_close(model(ids()), before, **FLOAT)


def test_o_proj_is_scaled_only_without_grouped_query_attention():
    def scaled(num_kv_heads):
        return [name for group in scale_groups(small_llama(num_kv_heads).layers[0]) for name in group.linears]
    assert "self_attn.o_proj" in scaled(4)
    assert "self_attn.o_proj" not in scaled(2)
    assert set(scaled(2)) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                              "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_awq_scaling_leaves_the_float_model_unchanged_and_changes_the_weights(num_kv_heads):
    model = small_llama(num_kv_heads)
    before, weights = model(ids()), {name: p.clone() for name, p in model.layers.named_parameters()}
    awq_scale_model(model, ids(4, 32), group_size=32)
    torch.testing.assert_close(model(ids()), before, **FLOAT)
    changed = [name for name, p in model.layers.named_parameters() if not torch.equal(p, weights[name])]
    assert changed   # some group chose alpha > 0 (a random model need not want it everywhere)


def output_error(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    return (x @ weight.T - x @ dequantized.T).pow(2).mean().item()


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_beats_rtn_on_a_layer_with_outlier_input_channels(group_size, symmetric):
    x, held_out = outlier_inputs(1024, 256, seed=0), outlier_inputs(1024, 256, seed=1)
    weight = torch.randn(96, 256)
    scales = awq_scales(x, [weight], group_size, symmetric)
    awq = quantize_int4(weight * scales, group_size, symmetric).dequantize() / scales
    rtn = quantize_int4(weight, group_size, symmetric).dequantize()
    for inputs in (x, held_out):
        assert output_error(inputs, weight, awq) < 0.7 * output_error(inputs, weight, rtn)


def test_awq_with_only_alpha_zero_is_rtn():
    x, weight = outlier_inputs(256, 64), torch.randn(8, 64)
    assert torch.equal(awq_scales(x, [weight], 32, grid=1), torch.ones(64))
