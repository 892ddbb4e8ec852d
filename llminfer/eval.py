"""Language-model evaluation: loss in nats per character, comparable across tokenizers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _logits(model: Callable, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def total_nats(
    model: Callable,
    token_ids: list[int],
    bos_token_id: int,
    context: int = 512,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> float:
    """Sum of -log p(token | previous tokens) over every token of `token_ids`.

    The text is cut into windows of `context` tokens that overlap by one, so each token is
    predicted exactly once, from at most `context - 1` tokens of history. The first window
    starts with `bos_token_id` so that the first token of the text is predicted too.
    Works with any model that maps `[batch, time]` ids to logits (llminfer's or transformers').
    """
    ids = [bos_token_id] + list(token_ids)
    windows = [ids[s : s + context] for s in range(0, len(ids) - 1, context - 1)]
    nats = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(len(w) for w in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, w in enumerate(batch):
            x[row, : len(w)] = torch.tensor(w)
            y[row, : len(w) - 1] = torch.tensor(w[1:])
        logits = _logits(model, x.to(device)).float()
        nats += F.cross_entropy(
            logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum"
        ).item()
    return nats


def _bos_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def nats_per_char(model: Callable, tokenizer, text: str, context: int = 512, **kwargs) -> float:
    """Validation loss in nats per character: total nats over the text divided by its length."""
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(token_ids) != text:
        raise ValueError("the tokenizer does not round-trip this text; nats per character would be wrong")
    return total_nats(model, token_ids, _bos_token_id(tokenizer), context=context, **kwargs) / len(text)


def perplexity(model: Callable, tokenizer, text: str, context: int = 512, **kwargs) -> float:
    """exp(mean nats per token): how many tokens the model is, on average, choosing between."""
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    nats = total_nats(model, token_ids, _bos_token_id(tokenizer), context=context, **kwargs)
    return math.exp(nats / len(token_ids))
