"""What a quantization method costs and saves: nats per character on held-out text, and bytes of weights.

Every method quantizes a fresh copy of the same float model with the same calibration windows (from the
training split) and is judged on the same held-out text, so the rows of the table differ by the method only.
A row may also store the KV cache quantized (`kv_cache_dtype`): the text is then scored through a paged
cache of that format, so every attention reads its keys and values back from one-byte codes.
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
from llminfer.quant.calibration import calibration_ids
from llminfer.quant.linear import QuantLinear
from llminfer.quant.quantize import CALIBRATED, decoder_linears, quantize_model

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


@torch.no_grad()
def evaluate_methods(settings=DEFAULT_SETTINGS, model_name: str = "tiny-shakespeare",
                     calibration_tokens: int = 4096, max_chars: int | None = None) -> list[dict]:
    """One row per (method, options): held-out nats per character, bytes of weights and of the KV cache per token,
    seconds to quantize."""
    model, tokenizer = load_model(model_name, device="cpu")
    text = train_val_split(tinyshakespeare_text())[1][:max_chars]
    ids = calibration_ids(tokenizer, calibration_tokens)
    rows = []
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
    return rows
