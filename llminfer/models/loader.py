"""Load a Hugging Face-format checkpoint (safetensors, one file or sharded) into `Llama`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llminfer.device import default_device, default_dtype, parse_device
from llminfer.models.config import ModelConfig, read_json_object
from llminfer.models.llama import Llama
from llminfer.models.registry import resolve_model_path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object naming the shard of each weight")
        shards = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise FileNotFoundError(f"{path / shard} is missing: {index.name} lists it as a shard")
        try:
            tensors.update(load_file(path / shard))
        except SafetensorError as exc:   # truncated or corrupted: its header does not describe the file
            raise ValueError(f"{path / shard} is not a valid safetensors file ({exc})") from exc
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
    device = parse_device(device) if device is not None else default_device()
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):  # no memory is spent on initial weights that are overwritten anyway
        model = Llama(config)
    model = model.to_empty(device=device).to(dtype or default_dtype(device))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    tensors = load_state_dict(path)
    try:
        load_weights(model, tensors)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return model.eval()


def load_model(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Return `(model, tokenizer)` for a shipped name, a local directory or a Hub id."""
    path = resolve_model_path(name_or_path)
    return load_checkpoint(path, device, dtype), load_tokenizer(path)


def load_tokenizer(path: Path):
    """The Hugging Face tokenizer stored in the model directory `path`."""
    from transformers import AutoTokenizer

    # A malformed file surfaces as whatever its parser raises (JSONDecodeError, KeyError, UnicodeDecodeError,
    # or the tokenizers library's plain Exception), so any of them means "this directory's tokenizer is broken".
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        detail = " ".join(str(exc).split())   # on one line
        raise ValueError(f"cannot load the tokenizer in {path}: {type(exc).__name__}: {detail}") from exc
