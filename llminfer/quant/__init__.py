"""Quantization: weights (and activations) in fewer bits, in layers that replace `nn.Linear`.

`quantize_model(model, method, ...)` swaps every decoder linear for a `QuantLinear` built by a method:
round-to-nearest int8/int4/fp8, GPTQ, AWQ, or SmoothQuant's W8A8. `checkpoint` saves and loads GPTQ's layout.
"""

from llminfer.quant.calibration import calibration_ids
from llminfer.quant.checkpoint import load_gptq, save_gptq
from llminfer.quant.evaluate import evaluate_methods, model_bytes
from llminfer.quant.linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear, W8A8Linear
from llminfer.quant.quantize import METHODS, quantize_model, quantize_on_load

__all__ = [
    "METHODS",
    "Fp8Linear",
    "Int4Linear",
    "Int8Linear",
    "QuantLinear",
    "W8A8Linear",
    "calibration_ids",
    "evaluate_methods",
    "load_gptq",
    "model_bytes",
    "quantize_model",
    "quantize_on_load",
    "save_gptq",
]
