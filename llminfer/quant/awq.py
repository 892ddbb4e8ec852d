"""AWQ (Lin et al. 2023): before rounding, scale up the weight columns that meet large activations, and fold the
inverse scale into the op before, so that the weights that matter most lose the least to rounding.

Multiplying input column j by s_j > 1 shrinks its rounding error relative to its size (the group's scale is
mostly set by the other columns), and x_j / s_j shrinks its contribution. AWQ sets s = mean|x|^alpha and
searches alpha on a grid for the smallest output error on calibration inputs. (The paper's second step,
searching a clipping range per group, is left out.)
"""

from __future__ import annotations

from functools import partial

import torch

from llminfer.models.llama import Llama
from llminfer.quant.formats import quantize_int4
from llminfer.quant.scaling import scale_model


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
