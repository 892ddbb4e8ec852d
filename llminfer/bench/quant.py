"""Quantization, measured for speed: each configuration of weights and KV cache against the float model, side by
side in one run, on the same prompts and seeds.

Two workloads, greedy with EOS ignored so every request runs to its length:
- `decode`: one prompt of `DECODE_PROMPT_LEN` random tokens, `decode_tokens` generated (batch 1, where every
  step reads all the weights for one token, so smaller weights should pay most);
- `throughput`: the random requests of `llminfer bench throughput` (256 prompts by default), all at once.

Every engine gets the same KV cache budget in bytes, so a quantized cache shows as more blocks, and the run's
longest request as its `max_model_len` (a long-context model's full context need not fit the budget). The
configurations alternate within each repeat, so a slow spell of a shared machine hits them all; medians are
reported, and each row's tokens/s over the float row's is its ratio. Tokens/s counts the tokens the engine returned.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import torch

from llminfer.bench.throughput import Request, failed, random_requests, run_llminfer
from llminfer.kv.quantized import KV_CACHE_DTYPES
from llminfer.quant.quantize import METHODS

BASELINE = "float"
DEFAULT_CONFIGS = ("float", "int8", "int4", "w8a8", "kv-int8", "int8+kv-int8")
DECODE_PROMPT_LEN = 32
DEFAULT_KV_CACHE_BYTES = 2**28   # 256 MiB: the default workload's float cache nearly fits; int8's easily does
BLOCK_SIZE = 16                  # the engine's default


@dataclass(frozen=True)
class Config:
    """One row: the weights' quantization (None: float) and the KV cache dtype ("auto": the model's)."""
    name: str
    quantization: str | None
    kv_cache_dtype: str


def parse_config(name: str) -> Config | None:
    """'int8+kv-int8' -> Config('int8+kv-int8', 'int8', 'int8'); 'kv-fp8' is float weights with an fp8 cache;
    None if `name` is not a configuration."""
    weights, kv = [], []
    for part in name.split("+"):
        if part == BASELINE or part in METHODS:
            weights.append(part)
        elif part.startswith("kv-") and part[3:] in KV_CACHE_DTYPES and part != "kv-auto":
            kv.append(part[3:])
        else:
            return None
    if len(weights) > 1 or len(kv) > 1 or not (weights or kv):
        return None
    quantization = weights[0] if weights and weights[0] != BASELINE else None
    return Config(name, quantization, kv[0] if kv else "auto")


def parse_configs(names) -> list[Config]:
    """The configurations named, the float baseline first (added if not named); unknown names refused."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"configs must be a list of names, got {names!r:.80}")
    unknown = [n for n in names if parse_config(n) is None]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(map(repr, unknown))}: a configuration is {BASELINE}, "
                         f"a quantization method ({', '.join(METHODS)}), kv-<cache dtype> "
                         f"({', '.join(d for d in KV_CACHE_DTYPES if d != 'auto')}), or weights+kv (int8+kv-int8)")
    configs = [parse_config(n) for n in names]
    settings = [(c.quantization, c.kv_cache_dtype) for c in configs]
    repeated = [c.name for i, c in enumerate(configs) if (c.quantization, c.kv_cache_dtype) in settings[:i]]
    if repeated:
        raise ValueError(f"configuration(s) {', '.join(map(repr, repeated))} repeat an earlier one")
    baseline = Config(BASELINE, None, "auto")
    return [baseline] + [c for c in configs if c.name != BASELINE and (c.quantization, c.kv_cache_dtype)
                         != (None, "auto")]


def longest_request(input_len: tuple[int, int], output_len: tuple[int, int], decode_tokens: int,
                    skip_throughput: bool) -> int:
    """Tokens of the longest request the run makes: every engine's `max_model_len`."""
    decode = DECODE_PROMPT_LEN + decode_tokens
    return decode if skip_throughput else max(decode, input_len[1] + output_len[1])


def check_arguments(model: str, configs, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    decode_tokens: int, repeats: int, kv_cache_memory_bytes: int, skip_throughput: bool,
                    device: str) -> list[Config]:
    """Refuse, naming the value, what cannot be measured, before any model is loaded: a count below 1, an unknown
    configuration, requests beyond the model's context, or a KV budget whose float cache cannot hold the longest
    request. Returns the parsed configurations."""
    from llminfer.device import default_dtype, parse_device
    from llminfer.kv.paged import kv_bytes_per_block
    from llminfer.models.config import ModelConfig
    from llminfer.models.registry import resolve_model_path

    for name, value in (("num_prompts", num_prompts), ("decode_tokens", decode_tokens), ("repeats", repeats),
                        ("kv_cache_memory_bytes", kv_cache_memory_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
    parsed = parse_configs(configs)
    device = parse_device(device)
    config = ModelConfig.from_pretrained(resolve_model_path(model))
    context = config.max_position_embeddings
    if not skip_throughput and input_len[1] + output_len[1] > context:
        raise ValueError(f"prompts of up to {input_len[1]} tokens plus outputs of up to {output_len[1]} tokens "
                         f"exceed the context of {model} ({context} tokens): lower the longest lengths")
    if DECODE_PROMPT_LEN + decode_tokens > context:
        raise ValueError(f"decode_tokens {decode_tokens} plus the {DECODE_PROMPT_LEN}-token prompt exceed the context "
                         f"of {model} ({context} tokens)")
    longest = longest_request(input_len, output_len, decode_tokens, skip_throughput)
    blocks = kv_cache_memory_bytes // kv_bytes_per_block(config, BLOCK_SIZE, default_dtype(device))
    if blocks * BLOCK_SIZE < longest:
        raise ValueError(f"kv_cache_memory_bytes {kv_cache_memory_bytes} holds {blocks * BLOCK_SIZE} tokens of "
                         f"{model}'s float cache, fewer than the longest request ({longest} tokens)")
    return parsed


def timed_run(llm, requests: list[Request]) -> dict:
    """One cold run of the requests (prefix cache emptied): seconds, tokens returned, and what the steps did."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine still holds blocks between runs")
    trace = llm.llm_engine.trace
    first = len(trace)
    seconds, outputs = run_llminfer(llm, requests)
    steps = trace[first:]
    decode = [r.duration for r in steps if all(n == 1 for n in r.scheduled.values())]
    return {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "failed_requests": sum(failed(o) for o in outputs), "steps": len(steps),
            "decode_step_seconds": statistics.median(decode) if decode else None,
            "preemptions": sum(len(r.preempted) for r in steps),
            "threads": Counter(r.threads for r in steps if r.threads is not None)}


def summarize_runs(runs: list[dict], requests: list[Request]) -> dict:
    """Median tokens/s over the runs, each run's tokens/s counting the tokens it returned."""
    rates = [r["output_tokens"] / r["seconds"] for r in runs]
    steps = [r["decode_step_seconds"] for r in runs if r["decode_step_seconds"] is not None]
    return {"requested_output_tokens": sum(r.output_len for r in requests),
            "output_tokens_each_run": [r["output_tokens"] for r in runs],
            "failed_requests": max(r["failed_requests"] for r in runs),
            "seconds_each_run": [r["seconds"] for r in runs],
            "output_tokens_per_s_each_run": rates,
            "output_tokens_per_s": statistics.median(rates),
            "decode_step_ms": statistics.median(steps) * 1e3 if steps else None,
            "preemptions": max(r["preemptions"] for r in runs),
            # thread counts the engine's tuner chose, over the steps of every run
            "step_threads": dict(sorted(sum((r["threads"] for r in runs), Counter()).items()))}


def add_ratios(rows: list[dict], workload: str) -> None:
    """Each row's tokens/s over the float row's (the first), None where either had a failed request."""
    base = rows[0][workload]
    for row in rows:
        mine = row[workload]
        comparable = not base["failed_requests"] and not mine["failed_requests"]
        mine["ratio_to_float"] = mine["output_tokens_per_s"] / base["output_tokens_per_s"] if comparable else None


def run(model: str = "tiny-shakespeare", configs=DEFAULT_CONFIGS, num_prompts: int = 256,
        input_len: tuple[int, int] = (16, 256), output_len: tuple[int, int] = (16, 256), decode_tokens: int = 128,
        repeats: int = 3, seed: int = 0, kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
        skip_throughput: bool = False, device: str = "cpu", log=print) -> dict:
    """Every configuration's batch-1 decode and (unless `skip_throughput`) throughput, against float's."""
    from llminfer import LLM
    from llminfer.quant.evaluate import model_bytes

    configs = check_arguments(model, configs, num_prompts, input_len, output_len, decode_tokens, repeats,
                              kv_cache_memory_bytes, skip_throughput, device)
    max_model_len = longest_request(input_len, output_len, decode_tokens, skip_throughput)
    engines = {}
    for config in configs:
        log(f"loading {model} as {config.name}")
        engines[config.name] = LLM(model, device=device, seed=seed, quantization=config.quantization,
                                   kv_cache_dtype=config.kv_cache_dtype, kv_cache_memory_bytes=kv_cache_memory_bytes,
                                   max_model_len=max_model_len)
    vocab_size = engines[BASELINE].model.config.vocab_size
    decode_requests = random_requests(vocab_size, 1, (DECODE_PROMPT_LEN,) * 2, (decode_tokens,) * 2, seed)
    workloads = {"decode": decode_requests}
    if not skip_throughput:
        workloads["throughput"] = random_requests(vocab_size, num_prompts, input_len, output_len, seed)
    runs = {(name, workload): [] for name in engines for workload in workloads}
    for workload, requests in workloads.items():
        for llm in engines.values():   # warm-up: first calls, and the thread tuner's first choices
            run_llminfer(llm, [Request(r.prompt_token_ids, 4) for r in requests[:4]])
        for repeat in range(repeats):
            for name, llm in engines.items():
                runs[name, workload].append(timed_run(llm, requests))
                log(f"{workload} {repeat + 1}/{repeats} {name}: "
                    f"{runs[name, workload][-1]['output_tokens'] / runs[name, workload][-1]['seconds']:.1f} tokens/s")
    rows = []
    for config in configs:
        llm = engines[config.name]
        rows.append({"config": config.name, "quantization": config.quantization,
                     "kv_cache_dtype": config.kv_cache_dtype, "weight_bytes": model_bytes(llm.model),
                     "kv_blocks": llm.llm_engine.kv_cache.num_blocks,
                     "kv_cache_bytes": llm.llm_engine.kv_cache.nbytes,
                     **{workload: summarize_runs(runs[config.name, workload], requests)
                        for workload, requests in workloads.items()},
                     **({"throughput": None} if skip_throughput else {})})
    for workload in workloads:
        add_ratios(rows, workload)
    weight = next(engines[BASELINE].model.parameters())
    return {"model": model, "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
            "configs": [c.name for c in configs], "num_prompts": None if skip_throughput else num_prompts,
            "input_len": list(input_len), "output_len": list(output_len), "decode_prompt_len": DECODE_PROMPT_LEN,
            "decode_tokens": decode_tokens, "repeats": repeats, "seed": seed,
            "kv_cache_memory_bytes": kv_cache_memory_bytes, "block_size": BLOCK_SIZE, "max_model_len": max_model_len,
            # the engine picks each step's thread count (up to this) itself; rows record what it chose
            "torch_threads": torch.get_num_threads(), "skip_throughput": skip_throughput, "rows": rows}


def format_table(result: dict) -> str:
    """The rows as a text table: weights, KV blocks, and tokens/s with the ratio to float for each workload."""
    def rate(entry: dict | None) -> str:
        if entry is None:
            return f"{'-':>10} {'':>6}"
        ratio = "-" if entry["ratio_to_float"] is None else f"{entry['ratio_to_float']:.2f}x"
        return f"{entry['output_tokens_per_s']:10.1f} {ratio:>6}"

    lines = [f"{result['model']} on {result['device']} ({result['dtype']}, up to {result['torch_threads']} threads), "
             f"median of {result['repeats']}; KV budget {result['kv_cache_memory_bytes'] / 2**20:.0f} MiB",
             f"{'config':14} {'weights MiB':>11} {'KV blocks':>9}   {'decode tok/s':>17}   {'throughput tok/s':>17}"]
    for row in result["rows"]:
        lines.append(f"{row['config']:14} {row['weight_bytes'] / 2**20:11.2f} {row['kv_blocks']:9d}   "
                     f"{rate(row['decode'])}   {rate(row['throughput'])}")
    failures = [f"{row['config']} {workload}" for row in result["rows"] for workload in ("decode", "throughput")
                if row[workload] is not None and row[workload]["failed_requests"]]
    if failures:
        lines.append(f"failed requests (no ratio): {', '.join(failures)}")
    return "\n".join(lines)
