"""What a quantization method costs and saves: nats per character on held-out text, and bytes of weights.

Every method quantizes a fresh copy of the same float model with the same calibration windows (from the
training split) and is judged on the same held-out text, so the rows of the table differ by the method only.
A row may also store the KV cache quantized (`kv_cache_dtype`): the text is then scored through a paged
cache of that format, so every attention reads its keys and values back from one-byte codes.

On a small model the differences between 4-bit methods are a few thousandths of a nat, and part of each is
luck: which way the rounding errors happen to point. `split=True` separates the two by also scoring the
float weights moved the *other* way, W0 - delta (delta = the method's weight error): the mean of the two
changes (even part) is what the error's size costs, the half-difference (odd part) flips with its sign.
"""

from __future__ import annotations

import copy
import time

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.eval import nats_per_char
from llminfer.kv.paged import PagedKVCache, kv_bytes_per_block
from llminfer.models.loader import load_model
from llminfer.quant.awq import awq_scale_model
from llminfer.quant.calibration import calibration_ids
from llminfer.quant.linear import QuantLinear
from llminfer.quant.quantize import CALIBRATED, decoder_linears, quantize_model

WEIGHT_ONLY = ("int8", "int4", "fp8", "gptq", "awq")   # methods whose error is all in the weights

# (method, options): "float" leaves the model as it is, "bf16" casts it; the others go to `quantize_model`.
# The option kv_cache_dtype ("int8", "fp8", ...) scores the model through a quantized KV cache.
DEFAULT_SETTINGS = (
    ("float", {}),
    ("bf16", {}),
    ("int8", {}),
    ("fp8", {}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 128}),
    ("gptq", {"group_size": 128}),
    ("gptq", {"group_size": 128, "act_order": True}),
    ("awq", {"group_size": 128}),
    ("awq", {"group_size": 128, "clip": False}),
    ("w8a8", {}),
    ("float", {"kv_cache_dtype": "int8"}),
    ("float", {"kv_cache_dtype": "fp8"}),
)


class ThroughCache:
    """`model(ids [batch, length])` computed as one prefill per row through a paged KV cache of `kv_cache_dtype`:
    each layer stores the row's keys and values, then attends over what it reads back, as the engine does."""

    def __init__(self, model: torch.nn.Module, kv_cache_dtype: str = "auto", block_size: int = 16):
        self.model, self.kv_cache_dtype, self.block_size = model, kv_cache_dtype, block_size

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        per_row = -(-length // self.block_size)
        param = next(self.model.parameters())
        cache = PagedKVCache(self.model.config, batch * per_row, self.block_size, param.device, param.dtype,
                             self.kv_cache_dtype)
        tables = [list(range(row * per_row, (row + 1) * per_row)) for row in range(batch)]
        meta = AttentionMetadata.build([length] * batch, [0] * batch, tables, self.block_size, param.device)
        return self.model(ids.flatten(), cache, meta).view(batch, length, -1)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (a tied LM head counted once)."""
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def decoder_linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder's linear layers, the part quantization shrinks."""
    return sum(module.weight_bytes() if isinstance(module, QuantLinear) else tensor_bytes(module.parameters())
               for module in decoder_linears(model).values())


def float_reference(model: torch.nn.Module, method: str, ids: torch.Tensor, options: dict) -> torch.nn.Module:
    """The float model in the basis `method` rounds in: a copy, with AWQ's scales folded in for "awq" (the same
    search on the same inputs, so the same scales; the function the model computes does not change)."""
    reference = copy.deepcopy(model)
    if method == "awq":
        awq_scale_model(reference, ids, options.get("group_size", 128), options.get("symmetric", True),
                        options.get("grid", 20))
    return reference


@torch.no_grad()
def mirrored(reference: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """The float model with every decoder weight moved by minus its quantization error: W0 - (Q(W0) - W0)."""
    mirror = copy.deepcopy(reference)
    quantized_layers = decoder_linears(quantized)
    for name, linear in decoder_linears(mirror).items():
        delta = quantized_layers[name].dequantize().to(linear.weight.dtype) - linear.weight
        linear.weight.sub_(delta)
    return mirror


@torch.no_grad()
def evaluate_methods(settings=DEFAULT_SETTINGS, model_name: str = "tiny-shakespeare",
                     calibration_tokens: int = 4096, max_chars: int | None = None, split: bool = False) -> list[dict]:
    """One row per (method, options): held-out nats per character, bytes of weights and of the KV cache per token,
    seconds to quantize. With `split`, weight-only rows also get `even` and `odd`: the loss change split into
    what the error's size costs and what flips with its sign (module docstring); even + odd = the change."""
    model, tokenizer = load_model(model_name, device="cpu")
    text = train_val_split(tinyshakespeare_text())[1][:max_chars]
    ids = calibration_ids(tokenizer, calibration_tokens)
    rows, base = [], None
    for method, options in settings:
        quantized = copy.deepcopy(model)
        weight_options = {k: v for k, v in options.items() if k != "kv_cache_dtype"}
        kv_cache_dtype = options.get("kv_cache_dtype", "auto")
        start = time.perf_counter()
        if method == "bf16":
            quantized.to(torch.bfloat16)
        elif method != "float":
            quantize_model(quantized, method, ids if method in CALIBRATED else None, **weight_options)
        seconds = time.perf_counter() - start
        scorer = quantized if kv_cache_dtype == "auto" else ThroughCache(quantized, kv_cache_dtype)
        dtype = next(quantized.parameters()).dtype
        rows.append({"method": method, **options, "nats_per_char": nats_per_char(scorer, tokenizer, text),
                     "decoder_linear_bytes": decoder_linear_bytes(quantized), "model_bytes": model_bytes(quantized),
                     "kv_bytes_per_token": kv_bytes_per_block(model.config, 1, dtype, kv_cache_dtype),
                     "quantize_s": round(seconds, 2)})
        if method == "float" and kv_cache_dtype == "auto":
            base = rows[-1]["nats_per_char"]
        if split and method in WEIGHT_ONLY and kv_cache_dtype == "auto":
            if base is None:
                base = nats_per_char(model, tokenizer, text)
            reference = float_reference(model, method, ids, weight_options)
            plus = rows[-1]["nats_per_char"] - base
            minus = nats_per_char(mirrored(reference, quantized), tokenizer, text) - base
            rows[-1].update(even=(plus + minus) / 2, odd=(plus - minus) / 2)
    return rows
