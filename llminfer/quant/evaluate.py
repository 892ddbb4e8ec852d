"""What a quantization method costs and saves: nats per character on held-out text, and bytes of weights.

Every method quantizes a fresh copy of the same float model with the same calibration windows (from the
training split) and is judged on the same held-out text, so the rows of the table differ by the method only.
"""

from __future__ import annotations

import copy
import time

import torch

from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.eval import nats_per_char
from llminfer.models.loader import load_model
from llminfer.quant.calibration import calibration_ids
from llminfer.quant.linear import QuantLinear
from llminfer.quant.quantize import CALIBRATED, decoder_linears, quantize_model

# (method, options): "float" leaves the model as it is; the others go to `quantize_model`.
DEFAULT_SETTINGS = (
    ("float", {}),
    ("int8", {}),
    ("fp8", {}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 128}),
    ("gptq", {"group_size": 128}),
    ("gptq", {"group_size": 128, "act_order": True}),
    ("awq", {"group_size": 128}),
    ("w8a8", {}),
)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (a tied LM head counted once)."""
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def decoder_linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder's linear layers, the part quantization shrinks."""
    return sum(module.weight_bytes() if isinstance(module, QuantLinear) else tensor_bytes(module.parameters())
               for module in decoder_linears(model).values())


@torch.no_grad()
def evaluate_methods(settings=DEFAULT_SETTINGS, model_name: str = "tiny-shakespeare",
                     calibration_tokens: int = 4096, max_chars: int | None = None) -> list[dict]:
    """One row per (method, options): held-out nats per character, bytes of weights, seconds to quantize."""
    model, tokenizer = load_model(model_name, device="cpu")
    text = train_val_split(tinyshakespeare_text())[1][:max_chars]
    ids = calibration_ids(tokenizer, calibration_tokens)
    rows = []
    for method, options in settings:
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        if method != "float":
            quantize_model(quantized, method, ids if method in CALIBRATED else None, **options)
        seconds = time.perf_counter() - start
        rows.append({"method": method, **options, "nats_per_char": nats_per_char(quantized, tokenizer, text),
                     "decoder_linear_bytes": decoder_linear_bytes(quantized), "model_bytes": model_bytes(quantized),
                     "quantize_s": round(seconds, 2)})
    return rows
