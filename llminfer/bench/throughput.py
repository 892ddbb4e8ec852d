"""Offline throughput: llminfer's engine against `transformers.generate()` on the same random requests.

Both run greedy with EOS ignored, so every request should produce exactly its output length. The
baseline is what people run every day: batches of `max_num_seqs` prompts, left-padded, each batch
generating until its longest request is done (static batching). Each engine's throughput counts the
tokens it returned, and the ratio is reported only when both returned the same number per request.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from llminfer.bench import busy
from llminfer.device import parse_device
from llminfer.engine.outputs import RequestOutput
from llminfer.sampling import SamplingParams

MAX_BENCH_SECONDS = 2 * 3600  # the busy-loop processes stop by themselves after this, whatever happens


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


def run_llminfer(llm, requests: list[Request]) -> tuple[float, list[RequestOutput]]:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=r.output_len, detokenize=False)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


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
            "token_agreement": sum(prefix) / total if total else None}


def failed(output: RequestOutput) -> bool:
    """Whether the engine refused or aborted the request instead of running it to its end."""
    return output.error is not None or output.outputs[0].finish_reason in ("error", "abort")


def summarize(requests: list[Request], ours: list[RequestOutput], theirs: list[list[int]], ours_seconds: float,
              theirs_seconds: float) -> dict:
    """Each engine's tokens/s from the tokens it returned, and their ratio only if it compares like with like:
    no llminfer request failed and both engines returned the same number of tokens for every request."""
    ours_tokens = [o.outputs[0].token_ids for o in ours]
    num_failed = sum(failed(o) for o in ours)
    mismatches = sum(len(x) != len(y) for x, y in zip(ours_tokens, theirs, strict=True))
    produced = {"llminfer": sum(map(len, ours_tokens)), "transformers": sum(map(len, theirs))}
    engines = {name: {"seconds": seconds, "output_tokens": produced[name],
                      "output_tokens_per_s": produced[name] / seconds}
               for name, seconds in (("llminfer", ours_seconds), ("transformers", theirs_seconds))}
    reasons = []
    if num_failed:
        reasons.append(f"{num_failed} of {len(requests)} llminfer requests failed")
    if mismatches:
        reasons.append(f"{mismatches} of {len(requests)} requests got outputs of different lengths from the engines")
    if not reasons and not produced["transformers"]:
        reasons.append("neither engine produced a token")
    speedup = None if reasons else (engines["llminfer"]["output_tokens_per_s"]
                                    / engines["transformers"]["output_tokens_per_s"])
    return {"requested_output_tokens": sum(r.output_len for r in requests), "failed_requests": num_failed,
            "length_mismatches": mismatches, **engines, "speedup": speedup,
            "no_speedup_because": "; ".join(reasons) or None, "outputs_agree": agreement(ours_tokens, theirs)}


def speedup_text(result: dict) -> str:
    """'speedup 2.38x', or why there is none."""
    if result["speedup"] is None:
        return f"no speedup reported: {result['no_speedup_because']}"
    return f"speedup {result['speedup']:.2f}x"


def check_arguments(model_name: str, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    max_num_seqs: int, max_num_batched_tokens: int, repeats: int, busy_cores: int,
                    device: str | None) -> None:
    """Refuse, before any model is loaded, a run that cannot measure what it says: a count below 1, a device
    this machine lacks, or requests that would not fit in the model's context (the engine would cut them short
    or refuse them)."""
    from llminfer.models.config import ModelConfig
    from llminfer.models.registry import resolve_model_path

    if device is not None:
        parse_device(device)
    for name, value in (("num_prompts", num_prompts), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
    busy.check_busy_cores(busy_cores)
    context = ModelConfig.from_pretrained(resolve_model_path(model_name)).max_position_embeddings
    if input_len[1] + output_len[1] > context:
        raise ValueError(f"prompts of up to {input_len[1]} tokens plus outputs of up to {output_len[1]} tokens "
                         f"exceed the context of {model_name} ({context} tokens): lower the longest lengths")


def run(model_name: str, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
        max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, device: str | None = None,
        dtype: str = "auto", repeats: int = 1, busy_cores: int = 0) -> dict:
    """Both engines on the same requests in this process; returns tokens/s of each and, if comparable, the ratio.

    With `repeats` > 1 the two alternate (ours, theirs, ours, ...) so a slow spell of a shared machine
    hits both, and the medians are reported; every run's seconds are recorded too. With `busy_cores` > 0
    that many processes spin a core each while the engines run, to measure a loaded machine."""
    check_arguments(model_name, num_prompts, input_len, output_len, max_num_seqs, max_num_batched_tokens, repeats,
                    busy_cores, device)
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
    trace = llm.llm_engine.trace
    ours_runs, theirs_runs = [], []
    with busy.busy_cores(busy_cores, MAX_BENCH_SECONDS):
        run_llminfer(llm, [Request(r.prompt_token_ids, 4) for r in warmup])
        run_transformers(hf, [Request(r.prompt_token_ids, 4) for r in warmup], max_num_seqs, pad)
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
    summary = summarize(requests, ours, theirs, statistics.median(ours_runs), statistics.median(theirs_runs))
    summary["llminfer"] |= {"seconds_each_run": ours_runs, "steps": len(steps),
                            "prefix_cache_hit_tokens": sum(n for r in steps for n in r.prefix_hits.values()),
                            "preemptions": sum(len(r.preempted) for r in steps)}
    summary["transformers"] |= {"seconds_each_run": theirs_runs, "batch_size": max_num_seqs}
    return {
        "model": model_name, "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
        "num_prompts": num_prompts, "input_len": list(input_len), "output_len": list(output_len), "seed": seed,
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens, "busy_cores": busy_cores,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests), "repeats": repeats, **summary,
    }
