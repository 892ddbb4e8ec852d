"""GPTQ (Frantar et al. 2022): quantize a weight one input column at a time, and after each column push its
rounding error onto the columns not yet quantized, where the layer's inputs can best absorb it.

For inputs X [tokens, in], the output error ||X W^T - X Q^T||^2 is, row by row, a quadratic in the weights
with Hessian H = 2 X^T X. Rounding column j changes it by e = w_j - q_j; the best fix of the later columns
(Optimal Brain Surgeon) subtracts e / [H^-1]_jj * [H^-1]_{j, j+1:}. The rows of the upper Cholesky factor
of H^-1 give those updates for every step at once, so H^-1 is never updated.
"""

from __future__ import annotations

import torch

from llminfer.models.llama import Llama
from llminfer.quant.calibration import capture_inputs, decoder_inputs
from llminfer.quant.formats import Int4Weight, check_group_size, int4_codes, int4_scales_zeros
from llminfer.quant.linear import Int4Linear


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / tokens for a layer's inputs x [tokens, in]; dividing by tokens (as GPTQ does) changes
    nothing but the scale, which the relative damping ignores."""
    x = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
    return 2 * x.T @ x / x.shape[0]


def inverse_hessian_cholesky(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = the damped inverse), lambda = percdamp * mean(diag H).

    Damping keeps H invertible when there are fewer tokens than inputs, or correlated inputs."""
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"the Hessian is not positive definite with percdamp={percdamp}; raise it") from exc


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  act_order: bool = False, percdamp: float = 0.01, block_size: int = 128) -> Int4Weight:
    """Group-wise int4 codes for weight [out, in] that minimise the output error on inputs with Hessian h [in, in].

    A group's scale and zero point are chosen when its first column is reached, from the columns as updated so
    far. With `act_order` the columns go in order of decreasing diag(H) (the inputs that matter most first);
    `g_idx` then records each column's group. Computes in fp32, or fp64 for an fp64 weight."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    if h.shape != (in_features, in_features):
        raise ValueError(f"the Hessian has shape {tuple(h.shape)}, the weight needs [{in_features}, {in_features}]")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    dtype = torch.promote_types(torch.promote_types(weight.dtype, h.dtype), torch.float32)
    w, h = weight.detach().to(dtype).clone(), h.to(dtype).clone()
    dead = h.diagonal() == 0          # inputs that were always 0: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_features, device=w.device)
    w, h = w[:, order], h[order][:, order]
    u = inverse_hessian_cholesky(h, percdamp)

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    # Whole groups per block, so that a group's scale is computed from columns that are up to date.
    block_size = max(block_size // group_size, 1) * group_size
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block, errors = w[:, start:end], torch.zeros(out_features, end - start, dtype=dtype, device=w.device)
        for i in range(end - start):
            if i % group_size == 0:
                scale, zero = int4_scales_zeros(block[:, i : i + group_size], symmetric)
                scales.append(scale)
                zeros.append(zero)
            codes[:, start + i] = int4_codes(block[:, i], scale, zero)
            errors[:, i] = (block[:, i] - (codes[:, start + i] - zero.to(dtype)) * scale) / u[start + i, start + i]
            block[:, i:] -= errors[:, i, None] * u[start + i, start + i : end]
        # Lazy batch update: the columns after this block receive all of its errors in one matmul.
        w[:, end:] -= errors @ u[start:end, end:]

    inverse = torch.argsort(order)
    g_idx = (torch.arange(in_features, device=w.device) // group_size)[inverse].to(torch.int32)
    return Int4Weight(codes[:, inverse], torch.stack(scales, 1).float(), torch.stack(zeros, 1), group_size,
                      g_idx if act_order else None)


# The linears of a decoder layer in the order they run; each group reads one input ("true sequential").
GPTQ_ORDER = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@torch.no_grad()
def gptq_quantize_model(model: Llama, ids: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                        act_order: bool = False, percdamp: float = 0.01) -> None:
    """Replace every decoder linear by its GPTQ `Int4Linear`, in place, one layer after another as the paper does:
    a layer's inputs come from the layers before it, already quantized, and inside a layer each group's
    inputs from the groups before it, already quantized."""
    hidden, cos, sin = decoder_inputs(model, ids)
    for layer in model.layers:
        for names in GPTQ_ORDER:
            linears = {name: layer.get_submodule(name) for name in names}
            inputs = capture_inputs(layer, (hidden, cos, sin), {names[0]: linears[names[0]]})
            h = hessian(inputs[names[0]])
            for name, linear in linears.items():
                weight = gptq_quantize(linear.weight, h, group_size, symmetric, act_order, percdamp)
                layer.set_submodule(name, Int4Linear(weight, linear.bias))
        hidden = layer(hidden, cos, sin)
