"""SmoothQuant (Xiao et al. 2022): make activations easy to quantize to int8 by moving their outliers into the
weights, then run W8A8: int8 weights times int8 activations, accumulated in int32.

A few activation channels are 10-100x larger than the rest, so one int8 scale per token wastes most codes on
them. Dividing channel j by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (and multiplying weight column j by it)
balances the two; alpha, the migration strength, says how much of the difficulty moves to the weights.
"""

from __future__ import annotations

from functools import partial

import torch

from llminfer.models.llama import Llama
from llminfer.quant.scaling import scale_model


@torch.no_grad()
def smoothing_scales(x: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) [in], for inputs x [tokens, in] read by weights [out_i, in]."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"migration strength alpha must lie in [0, 1], got {alpha}")
    x_max = x.detach().abs().amax(dim=0).float().clamp_min(1e-5)
    w_max = torch.cat([weight.detach().float() for weight in weights]).abs().amax(dim=0).clamp_min(1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


def smooth_model(model: Llama, ids: torch.Tensor, alpha: float = 0.5) -> None:
    """Fold SmoothQuant's scales into every decoder layer (the model stays float and computes the same)."""
    scale_model(model, ids, partial(smoothing_scales, alpha=alpha))
