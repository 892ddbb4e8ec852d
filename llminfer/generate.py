"""Part I's generation loop: one token at a time, recomputing the whole sequence each step.

This is the loop without a KV cache; every step costs a forward pass over all tokens so far,
which is exactly what the KV cache chapter removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from llminfer.sampling import SamplingParams, make_generator, sample_next_token


@dataclass
class Generation:
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence or stop token) or "length"


def check_prompt(prompt_token_ids: list[int], max_context: int) -> None:
    if not prompt_token_ids:
        raise ValueError("prompt is empty: give at least one token")
    if len(prompt_token_ids) >= max_context:
        raise ValueError(
            f"prompt has {len(prompt_token_ids)} tokens; the model's context is {max_context}, "
            "which leaves no room to generate"
        )


def stop_token_ids(model: torch.nn.Module, params: SamplingParams) -> set[int]:
    """Tokens that end generation: the request's stop tokens, and the model's EOS unless ignored."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.config.eos_token_ids))


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module, prompt_token_ids: list[int], params: SamplingParams
) -> Iterator[int]:
    """Yield new token ids one by one, each from a full forward pass over the sequence so far."""
    max_context = model.config.max_position_embeddings
    check_prompt(prompt_token_ids, max_context)
    device = next(model.parameters()).device
    generator = make_generator(params, device)
    stop_ids = stop_token_ids(model, params)
    tokens = torch.tensor([prompt_token_ids], device=device)
    for _ in range(params.max_tokens):
        logits = model(tokens)[:, -1, :]          # only the last position predicts the next token
        next_token = sample_next_token(logits, params, generator)
        yield int(next_token)
        # Stop at a stop token, or when the next forward pass would exceed the context.
        if int(next_token) in stop_ids or tokens.shape[1] >= max_context:
            return
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)


def generate(model: torch.nn.Module, tokenizer, prompt: str, params: SamplingParams) -> Generation:
    """Generate a continuation of `prompt` as text, and say why generation stopped."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    token_ids = list(generate_tokens(model, prompt_ids, params))
    finish_reason = "stop" if token_ids and token_ids[-1] in stop_token_ids(model, params) else "length"
    text_ids = token_ids[:-1] if finish_reason == "stop" else token_ids
    return Generation(prompt, prompt_ids, tokenizer.decode(text_ids), token_ids, finish_reason)
