"""Calibration: token ids from the training text, and the inputs each linear layer sees when the model reads them.

GPTQ, AWQ and SmoothQuant all look at real activations. Quantizing one decoder layer at a time, they need
that layer's input (the hidden states after the layers before it) and, inside it, each linear's input.
"""

from __future__ import annotations

import torch
from torch import nn

from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.models.llama import Llama, rope_cos_sin, rope_inv_freq


def calibration_ids(tokenizer, num_tokens: int = 4096, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """num_tokens // seq_len random windows of seq_len tokens of the training split, int64 [windows, seq_len].

    The held-out split, which evaluation reads, is never used for calibration."""
    if seq_len <= 0 or num_tokens < seq_len:
        raise ValueError(f"need num_tokens >= seq_len > 0, got num_tokens={num_tokens}, seq_len={seq_len}")
    ids = torch.tensor(tokenizer.encode(train_val_split(tinyshakespeare_text())[0], add_special_tokens=False))
    if len(ids) < seq_len:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_tokens // seq_len,), generator=generator)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])


def check_calibration_ids(model: Llama, ids: torch.Tensor | None, method: str) -> torch.Tensor:
    """`ids` on the model's device if they are a usable calibration batch [windows, length], else ValueError."""
    if ids is None:
        raise ValueError(f"method {method!r} needs calibration data: pass calibration_ids=calibration_ids(tokenizer)")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 or ids.dtype != torch.long:
        raise ValueError(f"calibration_ids must be a non-empty int64 tensor [windows, length], got {ids!r:.80}")
    cfg = model.config
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"calibration windows of {ids.shape[1]} tokens exceed the model's context "
                         f"{cfg.max_position_embeddings}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"calibration ids must lie in 0..{cfg.vocab_size - 1}, got {ids.min()}..{ids.max()}")
    return ids.to(model.embed_tokens.weight.device)


@torch.no_grad()
def decoder_inputs(model: Llama, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the first decoder layer reads for ids [batch, length]: hidden states [batch, length, hidden]
    and the rotary cos, sin [length, head_dim] (as `Llama.forward` computes them without a cache)."""
    cfg = model.config
    positions = torch.arange(ids.shape[1], device=ids.device)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    return model.embed_tokens(ids), cos, sin


@torch.no_grad()
def capture_inputs(module: nn.Module, args: tuple, readers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Run `module(*args)` with hooks on `readers` (modules inside it) and return what each one read,
    flattened to [tokens, in_features]."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def save(reader: nn.Module, inputs: tuple) -> None:
            captured[name] = inputs[0].reshape(-1, inputs[0].shape[-1]).detach()
        return save

    handles = [reader.register_forward_pre_hook(hook(name)) for name, reader in readers.items()]
    try:
        module(*args)
    finally:
        for handle in handles:
            handle.remove()
    return captured
