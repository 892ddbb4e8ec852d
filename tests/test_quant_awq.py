"""AWQ and the scale folding it shares with SmoothQuant: folding leaves the float model's function unchanged,
and AWQ's searched scales give lower int4 output error than round-to-nearest where some inputs are large."""

import pytest
import torch
from quant_helpers import outlier_inputs, small_llama

from llminfer.quant.awq import awq_clip, awq_clip_model, awq_scale_model, awq_scales
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


def group_errors(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, groups]: mean over tokens of each group's part of the output error, x_g (Q(w)_g - w_g)^T, one by one."""
    return torch.stack([(x[:, k:k + group_size] @ (dequantized - weight)[:, k:k + group_size].T).pow(2).mean(dim=0)
                        for k in range(0, weight.shape[1], group_size)], dim=1)


def clip_by_brute_force(x, weight, group_size, symmetric, ratios):
    """Try every ratio on every (row, group) separately, quantizing one group at a time."""
    clipped = weight.clone()
    for row in range(weight.shape[0]):
        for k in range(0, weight.shape[1], group_size):
            w, xg = weight[row:row + 1, k:k + group_size], x[:, k:k + group_size]
            candidates = [w.clamp(-r * w.abs().max(), r * w.abs().max()) for r in ratios]
            errors = [(xg @ (quantize_int4(c, group_size, symmetric).dequantize() - w).T).pow(2).mean()
                      for c in candidates]
            clipped[row, k:k + group_size] = candidates[int(torch.stack(errors).argmin())]
    return clipped


@pytest.mark.parametrize("out_features,in_features,group_size", [(5, 64, 32), (7, 48, 16), (3, 96, 96)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clip_matches_a_brute_force_search_and_never_raises_a_groups_error(out_features, in_features,
                                                                                 group_size, symmetric):
    x, weight = outlier_inputs(200, in_features, seed=2).double(), torch.randn(out_features, in_features).double()
    weight[:, 1] *= 6   # some outlier weights, meeting small inputs: clipping them is cheap
    clipped = awq_clip(x, weight, group_size, symmetric)
    ratios = [1 - step / 20 for step in range(10)]
    torch.testing.assert_close(clipped, clip_by_brute_force(x, weight, group_size, symmetric, ratios), rtol=0, atol=0)
    before = group_errors(x, weight, quantize_int4(weight, group_size, symmetric).dequantize(), group_size)
    after = group_errors(x, weight, quantize_int4(clipped, group_size, symmetric).dequantize(), group_size)
    assert (after <= before * (1 + 1e-12)).all(), f"worst ratio {(after / before).max():.4f}"
    assert (after < before).any()


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_an_outlier_weight_that_meets_small_inputs_cuts_the_error(symmetric):
    """One weight per row is 20x the others but its input channel is 100x smaller than the rest: rounding with
    the full range wastes the grid on it, and clamping it costs almost nothing."""
    x, held_out = torch.randn(512, 64), torch.randn(512, 64)
    x[:, 5] *= 0.01
    held_out[:, 5] *= 0.01
    weight = torch.randn(16, 64)
    weight[:, 5] = 20.0
    clipped = awq_clip(x, weight, 32, symmetric)
    assert (clipped[:, 5] <= 0.6 * 20.0 + 1e-5).all()   # clipped to (nearly) the end of the grid
    for inputs in (x, held_out):
        rtn = output_error(inputs, weight, quantize_int4(weight, 32, symmetric).dequantize())
        awq = output_error(inputs, weight, quantize_int4(clipped, 32, symmetric).dequantize())
        assert awq < 0.5 * rtn, f"clipped {awq:.4f} vs round to nearest {rtn:.4f}"


def test_clipped_weights_only_move_towards_zero_within_the_grid():
    x, weight = outlier_inputs(300, 128, seed=3), torch.randn(24, 128) * torch.rand(24, 128).pow(4) * 5
    clipped = awq_clip(x, weight, 32)
    assert (clipped.abs() <= weight.abs()).all() and (clipped * weight >= 0).all()
    changed = clipped != weight
    assert changed.any()
    # A clamped weight sits at the bound, the group's largest |w| times a ratio in 0.55..1.
    largest = weight.abs().reshape(24, 4, 32).amax(dim=-1).repeat_interleave(32, dim=1)
    ratio = clipped.abs()[changed] / largest[changed]
    assert (ratio >= 0.55 - 1e-6).all() and (ratio < 1).all()


def test_awq_clip_checks_shapes():
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 64"):
        awq_clip(torch.randn(10, 64), torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match=r"inputs must be \[tokens, 64\], got \[10, 32\]"):
        awq_clip(torch.randn(10, 32), torch.randn(4, 64), 32)


def test_awq_clip_model_clips_every_decoder_linear_but_q_and_k():
    model = small_llama()
    before = {name: p.clone() for name, p in model.layers.named_parameters()}
    awq_clip_model(model, ids(4, 32), group_size=32)
    for name, p in model.layers.named_parameters():
        if "q_proj" in name or "k_proj" in name or "norm" in name:
            assert torch.equal(p, before[name]), name
        else:
            assert (p.abs() <= before[name].abs()).all() and not torch.equal(p, before[name]), name
