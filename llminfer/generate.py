"""Part I's generation loops, one token at a time, without and with a KV cache.

`generate_tokens_no_cache` recomputes the whole sequence at every step: simple, and
quadratic in the length. `generate_tokens` keeps every layer's keys and values in a
contiguous cache, so the prompt is processed once (prefill) and each later step feeds the
model a single token (decode). Both produce the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llminfer.kv.contiguous import ContiguousKVCache
from llminfer.sampling import Logprob, SamplingParams, find_stop, make_generator, next_token, top_logprobs


@dataclass
class Generation:
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence, a stop token or a stop string) or "length"
    logprobs: list[dict[int, Logprob]] | None = None         # per generated token, if asked for
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # None for the first prompt token


def check_prompt(prompt_token_ids: list[int], max_context: int) -> None:
    if not prompt_token_ids:
        raise ValueError("prompt is empty: give at least one token")
    if len(prompt_token_ids) >= max_context:
        raise ValueError(
            f"prompt has {len(prompt_token_ids)} tokens; the model's context is {max_context}, "
            "which leaves no room to generate"
        )


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; a string that is not valid Unicode (a lone surrogate such as "\\ud800", which
    no UTF-8 byte sequence encodes) raises ValueError saying where, instead of the tokenizer's TypeError."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"prompt is not valid Unicode text: {exc.reason} at index {exc.start} "
                         f"({prompt[exc.start:exc.end]!r})") from None
    return tokenizer.encode(prompt, add_special_tokens=False) if prompt else []


def stop_token_ids(model: torch.nn.Module, params: SamplingParams) -> set[int]:
    """Tokens that end generation: the request's stop tokens, and the model's EOS unless ignored."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.config.eos_token_ids))


class _Decoder:
    """What both loops share: picking the next token, and deciding when to stop."""

    def __init__(self, model: torch.nn.Module, prompt_token_ids: list[int], params: SamplingParams,
                 logprobs_out: list | None):
        self.max_context = model.config.max_position_embeddings
        check_prompt(prompt_token_ids, self.max_context)
        self.device = next(model.parameters()).device
        self.params, self.prompt, self.output = params, prompt_token_ids, []
        self.eos_ids = model.config.eos_token_ids
        self.generator = make_generator(params, self.device)
        self.stop_ids = stop_token_ids(model, params)
        self.logprobs_out = logprobs_out if params.logprobs is not None else None

    def pick(self, logits: torch.Tensor) -> int:
        token = next_token(logits, self.params, self.generator, self.prompt, self.output, self.eos_ids)
        if self.logprobs_out is not None:
            self.logprobs_out.append(top_logprobs(logits, token, self.params.logprobs))
        self.output.append(token)
        return token

    def done(self, token: int, tokens_fed: int) -> bool:
        # Stop at a stop token, after max_tokens, or when one more token would exceed the context.
        limit = self.params.max_tokens
        return (token in self.stop_ids or (limit is not None and len(self.output) >= limit)
                or tokens_fed >= self.max_context)


@torch.no_grad()
def generate_tokens_no_cache(
    model: torch.nn.Module, prompt_token_ids: list[int], params: SamplingParams, logprobs_out: list | None = None
) -> Iterator[int]:
    """Yield new token ids one by one, each from a full forward pass over the sequence so far."""
    decoder = _Decoder(model, prompt_token_ids, params, logprobs_out)
    tokens = torch.tensor([prompt_token_ids], device=decoder.device)
    while True:
        logits = model(tokens)[0, -1]            # only the last position predicts the next token
        token = decoder.pick(logits)
        yield token
        if decoder.done(token, tokens.shape[1]):
            return
        tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module, prompt_token_ids: list[int], params: SamplingParams, logprobs_out: list | None = None
) -> Iterator[int]:
    """Yield new token ids one by one: prefill the prompt into a KV cache, then feed one token per step.

    With `params.logprobs` set, each step appends its `{token id: Logprob}` to `logprobs_out`."""
    decoder = _Decoder(model, prompt_token_ids, params, logprobs_out)
    limit = params.max_tokens if params.max_tokens is not None else decoder.max_context
    room = min(len(prompt_token_ids) + limit - 1, decoder.max_context)
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(model.config, batch_size=1, max_len=room, device=decoder.device, dtype=dtype)
    new_tokens = torch.tensor(prompt_token_ids, device=decoder.device)
    while True:
        meta = cache.append([len(new_tokens)])    # where the new tokens' keys and values go
        logits = model(new_tokens, cache, meta)[-1]
        token = decoder.pick(logits)
        yield token
        if decoder.done(token, cache.lengths[0]):
            return
        new_tokens = new_tokens.new_tensor([token])


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, prompt_token_ids: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """Log probability of each prompt token given the ones before it (None for the first), as in vLLM."""
    logits = model(torch.tensor([prompt_token_ids], device=next(model.parameters()).device))[0]
    return [None] + [top_logprobs(logits[t - 1], prompt_token_ids[t], k) for t in range(1, len(prompt_token_ids))]


def generate(model: torch.nn.Module, tokenizer, prompt: str, params: SamplingParams,
             use_cache: bool = True) -> Generation:
    """Generate a continuation of `prompt` as text, and say why generation stopped."""
    if params.n != 1:
        raise ValueError(f"n={params.n}: the Part I loop generates one sequence per prompt; llminfer.LLM does n > 1")
    prompt_ids = encode_prompt(tokenizer, prompt)
    loop = generate_tokens if use_cache else generate_tokens_no_cache
    logprobs = [] if params.logprobs is not None else None
    stop_ids = stop_token_ids(model, params)
    token_ids, finish_reason, text = [], "length", ""
    for token in loop(model, prompt_ids, params, logprobs):
        token_ids.append(token)
        if token in stop_ids:   # the stop token's text is left out unless asked for, as in vLLM
            finish_reason = "stop"
            if params.include_stop_str_in_output:
                text = tokenizer.decode(token_ids)
            break
        text = tokenizer.decode(token_ids)
        if params.stop and len(token_ids) >= params.min_tokens:
            text, stopped = find_stop(text, params.stop, params.include_stop_str_in_output)
            if stopped:
                finish_reason = "stop"
                break
    return Generation(
        prompt, prompt_ids, text, token_ids, finish_reason,
        logprobs=logprobs[: len(token_ids)] if logprobs is not None else None,
        prompt_logprobs=(prompt_logprobs(model, prompt_ids, params.prompt_logprobs)
                         if params.prompt_logprobs is not None else None),
    )
