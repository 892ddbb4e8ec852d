"""Load a Hugging Face-format checkpoint (safetensors, one file or sharded) into `Llama`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from llminfer.device import default_device, default_dtype
from llminfer.models.config import ModelConfig
from llminfer.models.llama import Llama
from llminfer.models.registry import resolve_model_path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(path / shard))
    return tensors


def load_weights(model: Llama, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model by name, refusing missing, extra or misshapen ones."""
    params = dict(model.named_parameters())
    tensors = {name.removeprefix("model."): t for name, t in tensors.items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def load_checkpoint(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Llama:
    """Build the model a local Hugging Face-format directory describes and load its weights."""
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):  # no memory is spent on initial weights that are overwritten anyway
        model = Llama(config)
    model = model.to_empty(device=device).to(dtype or default_dtype(device))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, load_state_dict(path))
    return model.eval()


def load_model(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Return `(model, tokenizer)` for a shipped name, a local directory or a Hub id."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    return load_checkpoint(path, device, dtype), AutoTokenizer.from_pretrained(path)
