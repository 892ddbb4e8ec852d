"""Offline throughput: llminfer's engine against `transformers.generate()` on the same random requests.

Both run greedy with EOS ignored, so every request produces exactly its output length. The baseline
is what people run every day: batches of `max_num_seqs` prompts, left-padded, each batch generating
until its longest request is done (static batching). Throughput counts only the tokens requested.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from llminfer.sampling import SamplingParams


@dataclass
class Request:
    prompt_token_ids: list[int]
    output_len: int


def parse_range(text: str) -> tuple[int, int]:
    """'16:256' -> (16, 256); '128' -> (128, 128)."""
    low, _, high = text.partition(":")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"a length range is 'A:B' or 'N' with integers, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"a length range needs 1 <= A <= B, got {text!r}")
    return bounds


def random_requests(vocab_size: int, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int) -> list[Request]:
    """Prompts of uniformly random token ids and lengths, with uniformly random output lengths."""
    rng = random.Random(seed)
    return [Request([rng.randrange(vocab_size) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
            for _ in range(num_prompts)]


def run_llminfer(llm, requests: list[Request]) -> tuple[float, list[list[int]]]:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=r.output_len, detokenize=False)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [o.outputs[0].token_ids for o in outputs]


@torch.no_grad()
def run_transformers(model, requests: list[Request], batch_size: int, pad_token_id: int) -> tuple[float, list]:
    """Static batches in request order, left-padded; each batch runs to its longest output."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    outputs = []
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        longest = max(r.output_len for r in batch)
        # No EOS: nothing stops early and nothing is masked, like `ignore_eos` in the engine.
        config = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                  eos_token_id=None, pad_token_id=pad_token_id)
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        outputs += [generated[row, width:width + r.output_len].tolist() for row, r in enumerate(batch)]
    return time.perf_counter() - start, outputs


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How many requests match exactly, and how many tokens match before the first difference."""
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
              for x, y in zip(ours, theirs, strict=True)]
    total = sum(len(y) for y in theirs)
    return {"requests_identical": sum(x == y for x, y in zip(ours, theirs, strict=True)), "requests": len(ours),
            "tokens_before_first_difference": sum(prefix), "tokens": total,
            "token_agreement": sum(prefix) / total}


def run(model_name: str, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
        max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, device: str | None = None,
        dtype: str = "auto", repeats: int = 1) -> dict:
    """Both engines on the same requests in this process; returns tokens/s of each and the ratio.

    With `repeats` > 1 the two alternate (ours, theirs, ours, ...) so a slow spell of a shared machine
    hits both, and the medians are reported; every run's seconds are recorded too."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    from transformers import AutoModelForCausalLM

    from llminfer.engine.llm import LLM
    from llminfer.models.registry import resolve_model_path

    llm = LLM(model_name, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, seed=seed)
    weight = next(llm.model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=weight.dtype)
    hf = hf.to(weight.device, weight.dtype).eval()   # the same dtype whatever the transformers version
    requests = random_requests(llm.model.config.vocab_size, num_prompts, input_len, output_len, seed)
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    warmup = requests[: min(4, len(requests))]
    run_llminfer(llm, [Request(r.prompt_token_ids, 4) for r in warmup])
    run_transformers(hf, [Request(r.prompt_token_ids, 4) for r in warmup], max_num_seqs, pad)
    trace = llm.llm_engine.trace
    ours_runs, theirs_runs = [], []
    for _ in range(repeats):
        # Start every run cold: the warm-up and earlier repeats ran these very prompts, and their blocks
        # would otherwise come back from the prefix cache, an advantage transformers does not get.
        if not llm.reset_prefix_cache():
            raise RuntimeError("the engine still holds blocks between runs")
        first_step = len(trace)
        seconds, ours = run_llminfer(llm, requests)
        ours_runs.append(seconds)
        steps = trace[first_step:]
        seconds, theirs = run_transformers(hf, requests, max_num_seqs, pad)
        theirs_runs.append(seconds)
    ours_s, theirs_s = statistics.median(ours_runs), statistics.median(theirs_runs)
    tokens = sum(r.output_len for r in requests)
    return {
        "model": model_name, "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
        "num_prompts": num_prompts, "input_len": list(input_len), "output_len": list(output_len), "seed": seed,
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests), "output_tokens": tokens,
        "repeats": repeats,
        "llminfer": {"seconds": ours_s, "output_tokens_per_s": tokens / ours_s, "seconds_each_run": ours_runs,
                     "steps": len(steps),
                     "prefix_cache_hit_tokens": sum(n for r in steps for n in r.prefix_hits.values()),
                     "preemptions": sum(len(r.preempted) for r in steps)},
        "transformers": {"seconds": theirs_s, "output_tokens_per_s": tokens / theirs_s,
                         "seconds_each_run": theirs_runs, "batch_size": max_num_seqs},
        "speedup": theirs_s / ours_s,
        "outputs_agree": agreement(ours, theirs),
    }
