"""AWQ (Lin et al. 2023): before rounding, scale up the weight columns that meet large activations, and fold the
inverse scale into the op before, so that the weights that matter most lose the least to rounding; then clip
each group's range, so that one large weight does not coarsen the grid for all the others.

Multiplying input column j by s_j > 1 shrinks its rounding error relative to its size (the group's scale is
mostly set by the other columns), and x_j / s_j shrinks its contribution. AWQ sets s = mean|x|^alpha and
searches alpha on a grid for the smallest output error on calibration inputs. The second step searches, per
output row and group, the fraction of the group's largest |w| to keep: clamping the few weights beyond it
costs them some error but gives every other weight of the group a finer grid.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from llminfer.models.llama import Llama
from llminfer.quant.calibration import capture_inputs, decoder_inputs
from llminfer.quant.formats import as_float, check_group_size, quantize_int4
from llminfer.quant.scaling import scale_model

# AWQ's reference leaves q_proj and k_proj unclipped: their errors reach the output through q k^T, a product of
# two quantized layers, which one layer's output error does not see.
UNCLIPPED = ("self_attn.q_proj", "self_attn.k_proj")


@torch.no_grad()
def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, symmetric: bool = True,
               grid: int = 20) -> torch.Tensor:
    """Scales [in] for linears with weights [out_i, in] that read x [tokens, in]: s = mean|x|^alpha, with the
    alpha in linspace(0, 1, grid) whose int4 layers (W s rounded, applied to x / s) best reproduce x W^T.

    alpha = 0 (s = 1) is plain round-to-nearest, so on these inputs AWQ is never worse than RTN."""
    x, w = x.float(), torch.cat([weight.detach().float() for weight in weights])
    target = x @ w.T
    magnitude = x.abs().mean(dim=0)
    best_error, best_scales = float("inf"), torch.ones_like(magnitude)
    for alpha in torch.linspace(0, 1, grid).tolist():
        scales = magnitude.pow(alpha).clamp_min(1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()   # centre the scales on 1 in log space
        # (x / s) Q(W s)^T = x (Q(W s) / s)^T: the quantized layer as seen from the unscaled input.
        error = (x @ (quantize_int4(w * scales, group_size, symmetric).dequantize() / scales).T - target)
        error = error.pow(2).mean().item()
        if error < best_error:
            best_error, best_scales = error, scales
    return best_scales


def awq_scale_model(model: Llama, ids: torch.Tensor, group_size: int, symmetric: bool = True,
                    grid: int = 20) -> None:
    """Search and fold AWQ scales into every decoder layer (the model stays float; round it afterwards)."""
    scale_model(model, ids, partial(awq_scales, group_size=group_size, symmetric=symmetric, grid=grid))


@torch.no_grad()
def awq_clip(x: torch.Tensor, weight: torch.Tensor, group_size: int, symmetric: bool = True, grid: int = 20,
             max_shrink: float = 0.5) -> torch.Tensor:
    """weight [out, in] with each group of each row clamped to [-r m, r m] (m: the group's largest |w|), r in
    1, 1 - 1/grid, ... down to 1 - max_shrink, the r whose rounded group best reproduces the group's part of the
    output on x [tokens, in]: r minimises mean over tokens of (x_g . (Q(clamp(w_g)) - w_g))^2.

    r = 1 is in the grid and is plain rounding, so no group's error grows. Round the result to nearest with the
    same group_size and symmetric: the clamped group's range is then r m, as the search assumed."""
    w = as_float(weight)
    out_features, in_features = w.shape
    check_group_size(in_features, group_size)
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"inputs must be [tokens, {in_features}], got {list(x.shape)}")
    x = x.to(w.dtype).reshape(len(x), -1, group_size)
    # mean_t (x_g . d)^2 = d^T H_g d with H_g = mean_t x_g x_g^T: one [group, group] matrix per group, so each
    # ratio costs the same however many calibration tokens there are.
    gram = torch.einsum("tgi,tgj->gij", x, x) / len(x)
    w = w.reshape(out_features, -1, group_size)
    largest = w.abs().amax(dim=-1, keepdim=True)
    best, best_error = w, torch.full_like(largest, float("inf"))
    for step in range(int(max_shrink * grid)):
        bound = largest * (1 - step / grid)
        clipped = torch.clamp(w, -bound, bound)
        error = quantize_int4(clipped.reshape(out_features, in_features), group_size, symmetric).dequantize()
        error = error.reshape_as(w) - w
        error = torch.einsum("ogi,gij,ogj->og", error, gram, error)[..., None]
        better = error < best_error
        best, best_error = torch.where(better, clipped, best), torch.where(better, error, best_error)
    return best.reshape(out_features, in_features).to(weight.dtype)


@torch.no_grad()
def awq_clip_model(model: Llama, ids: torch.Tensor, group_size: int, symmetric: bool = True) -> None:
    """Clip the weights of every decoder linear but q_proj and k_proj (`awq_clip`), in place, after the scales
    are folded: each layer reads what the float model feeds it, as in the reference implementation."""
    hidden, cos, sin = decoder_inputs(model, ids)
    for layer in model.layers:
        linears = {name: module for name, module in layer.named_modules()
                   if isinstance(module, nn.Linear) and name not in UNCLIPPED}
        inputs = capture_inputs(layer, (hidden, cos, sin), linears)
        hidden = layer(hidden, cos, sin)   # before clipping changes the layer
        for name, linear in linears.items():
            linear.weight.copy_(awq_clip(inputs[name], linear.weight, group_size, symmetric))
