"""`quantize_model`: replace every linear layer of the decoder by its quantized version, in place.

The token embedding and the LM head stay in floating point, as GPTQ and AWQ leave them: the embedding is a
table lookup (no matmul to speed up, and only one row is read per token), and the LM head's rounding errors
land directly on the logits, with no later layer to average them out.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from llminfer.models.llama import Llama
from llminfer.quant.awq import awq_clip_model, awq_scale_model
from llminfer.quant.calibration import calibration_ids, check_calibration_ids
from llminfer.quant.formats import check_group_size
from llminfer.quant.gptq import gptq_quantize_model
from llminfer.quant.linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear, W8A8Linear
from llminfer.quant.smoothquant import smooth_model

METHODS = {
    "int8": "weight-only int8, one scale per output channel, round to nearest",
    "int4": "weight-only int4, a scale per group of group_size inputs, round to nearest",
    "fp8": "weight-only fp8 (e4m3), one scale per output channel",
    "gptq": "weight-only int4 by GPTQ (needs calibration data)",
    "awq": "weight-only int4 after AWQ's activation-aware scaling and clipping (needs calibration data)",
    "w8a8": "int8 weights and activations after SmoothQuant's smoothing (needs calibration data)",
}
GROUPED = ("int4", "gptq", "awq")
CALIBRATED = ("gptq", "awq", "w8a8")


def decoder_linears(model: Llama) -> dict[str, nn.Module]:
    """Every linear layer (float or quantized) inside the decoder layers, by name (`layers.0.self_attn.q_proj`)."""
    return {name: module for name, module in model.layers.named_modules(prefix="layers")
            if isinstance(module, (nn.Linear, QuantLinear))}


@torch.no_grad()
def quantize_model(model: Llama, method: str, calibration_ids: torch.Tensor | None = None, group_size: int = 128,
                   symmetric: bool = True, act_order: bool = False, percdamp: float = 0.01,
                   alpha: float = 0.5, grid: int = 20, clip: bool = True) -> Llama:
    """Quantize `model`'s decoder linears with `method` (one of `METHODS`) and return the model.

    calibration_ids [windows, length] (see `calibration_ids()`) are needed by gptq, awq and w8a8; group_size and
    symmetric apply to the int4 methods, act_order and percdamp to gptq, alpha (migration strength) to w8a8,
    grid (how many alphas AWQ tries) and clip (whether AWQ also searches a clipping range per group) to awq."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    linears = decoder_linears(model)
    done = [name for name, module in linears.items() if not isinstance(module, nn.Linear)]
    if done:
        raise ValueError(f"the model is already quantized ({done[0]} is {type(linears[done[0]]).__name__})")
    if method in GROUPED:
        for name, linear in linears.items():
            check_group_size(linear.in_features, group_size, name)
    ids = check_calibration_ids(model, calibration_ids, method) if method in CALIBRATED else None
    if method == "gptq":
        gptq_quantize_model(model, ids, group_size, symmetric, act_order, percdamp)
        return model
    if method == "awq":
        awq_scale_model(model, ids, group_size, symmetric, grid)
        if clip:
            awq_clip_model(model, ids, group_size, symmetric)
    elif method == "w8a8":
        smooth_model(model, ids, alpha)
    build = {
        "int8": Int8Linear.from_float,
        "int4": partial(Int4Linear.from_float, group_size=group_size, symmetric=symmetric),
        "awq": partial(Int4Linear.from_float, group_size=group_size, symmetric=symmetric),
        "fp8": Fp8Linear.from_float,
        "w8a8": W8A8Linear.from_float,
    }[method]
    for name, linear in linears.items():
        model.set_submodule(name, build(linear))
    return model


def check_method(method) -> str:
    """`method` if it names one of `METHODS`, else ValueError naming it."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"quantization must be None or one of {', '.join(map(repr, METHODS))}, got {method!r:.80}")
    return method


def quantize_on_load(model: Llama, method: str, tokenizer) -> Llama:
    """What `LLM(model, quantization=method)` does: quantize the float checkpoint just loaded, with the default
    options, calibrating on windows of the training split where the method needs activations.

    vLLM's `quantization="gptq"` or `"awq"` reads weights someone quantized before; llminfer quantizes at load
    time instead, so any shipped or random-initialised model can be tried with every method."""
    check_method(method)
    ids = None
    if method in CALIBRATED:
        if tokenizer is None:
            raise ValueError(f"quantization={method!r} calibrates on text, which needs the model's tokenizer")
        length = min(512, model.config.max_position_embeddings)
        ids = calibration_ids(tokenizer, num_tokens=8 * length, seq_len=length)
    return quantize_model(model, method, ids)
