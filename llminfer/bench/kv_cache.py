"""Generation with and without the KV cache, side by side on the same prompt and lengths."""

from __future__ import annotations

import time

import torch

from llminfer.bench.record import summarize
from llminfer.generate import generate_tokens, generate_tokens_no_cache
from llminfer.sampling import SamplingParams

PROMPT_TOKENS = 16


def time_loop(loop, model, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    produced = sum(1 for _ in loop(model, prompt, params))
    elapsed = time.perf_counter() - start
    assert produced == new_tokens, f"generated {produced} tokens, expected {new_tokens}"
    return elapsed


def run(model, totals: list[int], repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to reach each total length (a 16-token prompt plus generated tokens), both loops."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()
    time_loop(generate_tokens, model, prompt, 8)                 # warm-up
    rows = []
    for total in totals:
        new = total - PROMPT_TOKENS
        cached = summarize([time_loop(generate_tokens, model, prompt, new) for _ in range(repeats)])
        uncached = summarize([time_loop(generate_tokens_no_cache, model, prompt, new) for _ in range(repeats)])
        rows.append({
            "total_tokens": total,
            "generated_tokens": new,
            "no_cache_s": uncached,
            "cache_s": cached,
            "speedup": uncached["median"] / cached["median"],
            "cache_tokens_per_s": new / cached["median"],
            "no_cache_tokens_per_s": new / uncached["median"],
        })
    return {"prompt_tokens": PROMPT_TOKENS, "repeats": repeats, "rows": rows}
