"""GPTQ: lower output error than round-to-nearest on correlated inputs, and the same codes as the paper's
unoptimised algorithm (one column at a time, the inverse Hessian updated by Gaussian elimination after each
column, no Cholesky factor, no lazy blocks), computed in fp64 so that no rounding decision can differ.
"""

import pytest
import torch

from llminfer.quant.formats import int4_codes, int4_scales_zeros, quantize_int4
from llminfer.quant.gptq import gptq_quantize, hessian


def correlated_inputs(tokens: int, features: int, rank: int = 8, samples: int = 1) -> list[torch.Tensor]:
    """`samples` draws of activations with a few strong shared directions, some large channels and a little
    noise, as in LLMs; every draw comes from the same distribution (the same directions and channels)."""
    mix, large = torch.randn(rank, features), torch.randperm(features)[:4]
    draws = []
    for _ in range(samples):
        x = torch.randn(tokens, rank) @ mix + 0.1 * torch.randn(tokens, features)
        x[:, large] *= 10
        draws.append(x)
    return draws


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return (x @ weight.T - x @ quantized.T).norm().item()


def naive_gptq(weight: torch.Tensor, h: torch.Tensor, group_size: int, symmetric: bool,
               percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Algorithm without its tricks: quantize column j, spread its error over the later columns with
    row j of H^-1, then remove j from H^-1 (Optimal Brain Surgeon's update). Returns (codes, dequantized)."""
    w, h = weight.double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    h_inv = torch.linalg.inv(h)
    codes, dequantized = torch.zeros_like(w, dtype=torch.uint8), torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            scale, zero = int4_scales_zeros(w[:, j : j + group_size], symmetric)
        codes[:, j] = int4_codes(w[:, j], scale, zero)
        dequantized[:, j] = (codes[:, j].double() - zero.double()) * scale
        error = (w[:, j] - dequantized[:, j]) / h_inv[j, j]
        w[:, j:] -= error[:, None] * h_inv[j, j:][None, :]
        h_inv = h_inv - h_inv[:, j, None] @ h_inv[None, j, :] / h_inv[j, j]
    return codes, dequantized


def test_hessian_is_twice_the_mean_outer_product():
    x = torch.randn(2, 5, 7)
    flat = x.reshape(10, 7).double()
    torch.testing.assert_close(hessian(x.double()), 2 * flat.T @ flat / 10)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_has_lower_output_error_than_rtn(group_size, symmetric, act_order):
    x, held_out = correlated_inputs(2048, 256, samples=2)
    weight = torch.randn(64, 256)
    gptq = gptq_quantize(weight, hessian(x), group_size, symmetric, act_order).dequantize()
    rtn = quantize_int4(weight, group_size, symmetric).dequantize()
    for inputs in (x, held_out):
        assert output_error(inputs, weight, gptq) < 0.5 * output_error(inputs, weight, rtn)


@pytest.mark.parametrize("group_size,block_size", [(32, 128), (32, 64), (64, 128), (128, 128), (32, 48), (64, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_matches_the_unoptimised_algorithm(group_size, block_size, symmetric):
    x, weight = correlated_inputs(512, 128)[0].double(), torch.randn(24, 128).double()
    h = hessian(x)
    fast = gptq_quantize(weight, h, group_size, symmetric, block_size=block_size)
    codes, dequantized = naive_gptq(weight, h, group_size, symmetric)
    same_rows = (fast.codes == codes).all(dim=1)
    # Symmetric int4 has an exact tie: -absmax / scale = -7.5, codes 0 and 1 equally near, which fp64 noise breaks
    # either way, and a row that breaks it differently goes on differently. Asymmetric int4 has no such tie.
    assert same_rows.all() if not symmetric else same_rows.float().mean() >= 0.9, f"rows differ: {~same_rows}"
    torch.testing.assert_close(fast.dequantize()[same_rows].double(), dequantized[same_rows], rtol=1e-6, atol=1e-6)


def test_act_order_is_the_algorithm_on_columns_sorted_by_hessian_diagonal():
    x, weight = correlated_inputs(512, 128)[0].double(), torch.randn(16, 128).double()
    h = hessian(x)
    fast = gptq_quantize(weight, h, 32, symmetric=False, act_order=True)
    order = torch.argsort(h.diagonal(), descending=True)
    codes, dequantized = naive_gptq(weight[:, order], h[order][:, order], 32, symmetric=False)
    assert torch.equal(fast.codes[:, order], codes)
    assert torch.equal(fast.g_idx[order].long(), torch.arange(128) // 32)   # column order[j] is in group j // 32
    torch.testing.assert_close(fast.dequantize()[:, order].double(), dequantized, rtol=1e-6, atol=1e-6)


def test_dead_inputs_get_zero_weights_and_no_nans():
    x = correlated_inputs(256, 64)[0]
    x[:, [3, 40]] = 0
    q = gptq_quantize(torch.randn(8, 64), hessian(x), 32)
    w = q.dequantize()
    assert torch.isfinite(w).all() and (w[:, [3, 40]] == 0).all()


def test_bad_arguments_are_named():
    weight, h = torch.randn(8, 64), hessian(torch.randn(100, 64))
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 64"):
        gptq_quantize(weight, h, 48)
    with pytest.raises(ValueError, match=r"Hessian has shape \(32, 32\)"):
        gptq_quantize(weight, h[:32, :32], 32)
    with pytest.raises(ValueError, match="percdamp=0"):   # 4 tokens, 64 inputs: H is singular without damping
        gptq_quantize(weight, hessian(torch.randn(4, 64)), 32, percdamp=0)
