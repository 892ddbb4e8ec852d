"""The measurements of the tuning chapter and of `benchmarks/tuning.py`: engine steps profiled with their stages
labelled (`profile_steps`), and one request set run by engines that differ in one setting (`run_sweep`), with TTFT
and TPOT from each request's metrics (`latency_summary`)."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import torch

import llminfer.models.llama as llama_module
from llminfer import LLM
from llminfer.attention.metadata import AttentionMetadata
from llminfer.bench import serve
from llminfer.bench.throughput import Request, run_llminfer
from llminfer.datasets import tinyshakespeare_text
from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.generate import encode_prompt
from llminfer.sampling import SamplingParams

DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "block_size": 16}
SWEEPS = {"max_num_seqs": (4, 16, 64, 256), "max_num_batched_tokens": (64, 256, 1024, 2048, 4096),
          "block_size": (8, 16, 32, 64)}
# Kineto, torch.profiler's backend, prints a "profiler_start"/"profiler_stop" line to stderr at every profile from
# torch 2.13 on (its USDT messages, severity 5); a threshold above that keeps notebooks and logs readable.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
KV_CACHE_BYTES = 2**28   # 256 MiB: ~87k tokens of the shipped model, room for every request of the default run
MATMULS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm"}
# The stages of a step, each labelled with torch.profiler.record_function while profiling, and the share each
# operator's self time goes to: the innermost label around it decides, and inside the model's forward a matrix
# multiplication counts as "matmuls". The self time of a label itself is the Python that runs between operators.
STEP, FORWARD = "engine step", "model forward"
SHARES = {"matmuls": "matrix multiplications of the model (aten::mm, addmm, linear)",
          "attention": "paged attention: storing K/V and the C kernel",
          "other model ops": "embedding, RMSNorm, RoPE, SiLU, adds, views, and Python inside the forward",
          "sampling": "the argmax over the logits and its bookkeeping",
          "scheduling": "Scheduler.schedule: the token budget and the block pool",
          "batch inputs": "AttentionMetadata.build: positions, slots, block tables",
          "engine Python": "the rest of LLMEngine.step: advancing counters, stop checks, outputs"}


# ---------------------------------------------------------------- the requests and one run


def corpus_requests(tokenizer, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0) -> list[Request]:
    """Windows of the Shakespeare corpus with lengths uniform in `input_len` tokens, each asking for a number of
    tokens uniform in `output_len`: the benchmark datasets' builder, as token ids the engine takes directly."""
    built = serve.random_requests(tokenizer, tinyshakespeare_text(), num_prompts, input_len, output_len, seed)
    return [Request(encode_prompt(tokenizer, r.prompt), r.output_len) for r in built]


def latency_summary(outputs: list[RequestOutput]) -> dict[str, float | None]:
    """TTFT, TPOT and end-to-end latency of each request from its metrics, as mean/median/p90/p99 in ms."""
    ttft, tpot, e2el = [], [], []
    for out in outputs:
        m, produced = out.metrics, len(out.outputs[0].token_ids)
        ttft.append(m.first_token_time - m.arrival_time)
        e2el.append(m.finished_time - m.arrival_time)
        if produced > 1:
            tpot.append((m.finished_time - m.first_token_time) / (produced - 1))
    return serve.latency_stats("ttft", ttft) | serve.latency_stats("tpot", tpot) | serve.latency_stats("e2el", e2el)


def measure(llm: LLM, requests: list[Request]) -> dict:
    """Run every request at once from an empty prefix cache: output tokens/s, latencies, and how the steps went."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine still holds blocks between runs")
    trace = llm.llm_engine.trace
    first = len(trace)
    seconds, outputs = run_llminfer(llm, requests)
    failed = [o for o in outputs if o.error is not None or o.outputs[0].finish_reason != "length"]
    if failed:
        raise RuntimeError(f"{len(failed)} requests did not run to their length, e.g. {failed[0].error!r}")
    steps = trace[first:]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "steps": len(steps), "preemptions": sum(len(s.preempted) for s in steps),
            "mean_step_ms": 1000 * statistics.fmean(s.duration for s in steps),
            "mean_tokens_per_step": statistics.fmean(sum(s.scheduled.values()) for s in steps),
            "mean_running": statistics.fmean(len(s.scheduled) for s in steps), **latency_summary(outputs)}


def median_of_runs(runs: list[dict]) -> dict:
    """Each number's median over the repeats (so one run's slow spell does not decide), and every run's seconds."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]} | {
        "seconds_each_run": [run["seconds"] for run in runs]}


# ---------------------------------------------------------------- the sweep


def sweep_settings(sweeps: dict[str, tuple[int, ...]]) -> list[dict[str, int]]:
    """One setting per value of each swept argument, the others at their defaults; the defaults appear once."""
    settings: list[dict[str, int]] = []
    for name, values in sweeps.items():
        for value in values:
            setting = DEFAULTS | {name: value}
            if setting not in settings:
                settings.append(setting)
    return settings


def run_sweep(model: str, requests: list[Request], settings: list[dict[str, int]], repeats: int,
              kv_cache_memory_bytes: int = KV_CACHE_BYTES, cpu_threads: int | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Each setting's engine on the same requests, `repeats` alternating rounds; the median of each number."""
    engines = [LLM(model, device="cpu", kv_cache_memory_bytes=kv_cache_memory_bytes, cpu_threads=cpu_threads, **s)
               for s in settings]
    for llm in engines:   # warm-up: first calls allocate, build the C kernel, and start the thread tuner
        run_llminfer(llm, [Request(r.prompt_token_ids, 4) for r in requests[:4]])
    runs: list[list[dict]] = [[] for _ in settings]
    for round_ in range(repeats):
        for setting, llm, done in zip(settings, engines, runs, strict=True):
            done.append(measure(llm, requests))
            log(f"round {round_ + 1}/{repeats} {setting}: {done[-1]['output_tokens_per_s']:6.0f} tok/s, "
                f"p90 TTFT {done[-1]['p90_ttft_ms']:7.0f} ms, p90 TPOT {done[-1]['p90_tpot_ms']:6.1f} ms")
    return [{"setting": s} | median_of_runs(done) for s, done in zip(settings, runs, strict=True)]


# ---------------------------------------------------------------- profiling a step


def labelled(name: str, fn: Callable) -> Callable:
    """`fn`, run inside a profiler label of its own."""
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def labelled_stages(engine: LLMEngine) -> Iterator[None]:
    """Label each stage of the engine's steps for the profiler; the originals come back afterwards."""
    runner = engine.runner
    patches = [mock.patch.object(engine.scheduler, "schedule", labelled("scheduling", engine.scheduler.schedule)),
               mock.patch.object(AttentionMetadata, "build", labelled("batch inputs", AttentionMetadata.build)),
               mock.patch.object(runner, "model", labelled(FORWARD, runner.model)),
               mock.patch.object(llama_module, "paged_attention", labelled("attention", llama_module.paged_attention)),
               mock.patch.object(runner, "_sample", labelled("sampling", runner._sample))]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def share_of(event) -> str | None:
    """Which share of the step an operator's self time belongs to (None: outside any engine step)."""
    labels = []
    parent = event
    while parent is not None:
        labels.append(parent.name)
        parent = parent.cpu_parent
    if STEP not in labels:
        return None
    innermost = next(name for name in labels if name in {STEP, FORWARD, *SHARES})
    if innermost == STEP:
        return "engine Python"
    if innermost == FORWARD:
        return "matmuls" if event.name in MATMULS else "other model ops"
    return innermost


def step_breakdown(events) -> dict[str, float]:
    """Milliseconds of each share of the profiled steps, from every event's self CPU time."""
    ms = dict.fromkeys(SHARES, 0.0)
    for event in events:
        share = share_of(event)
        if share is not None:
            ms[share] += event.self_cpu_time_total / 1000
    return ms


def top_operators(prof, count: int) -> list[dict]:
    """The operators with the most self CPU time (the profiler's labels excluded: they are the Python between)."""
    rows = [e for e in prof.key_averages() if e.key not in {STEP, FORWARD, *SHARES}]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"name": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000,
             "total_ms": e.cpu_time_total / 1000} for e in rows[:count]]


def run_steps(engine: LLMEngine, requests: list[Request], decode_steps: int,
              wrap: Callable[[str], contextlib.AbstractContextManager]) -> list[tuple[str, float, int]]:
    """Submit `requests`, run their prefill step and `decode_steps` decode steps, each step inside `wrap(phase)`,
    then abort them and forget their prefixes. Returns (phase, seconds, threads) per step, from the trace."""
    ids = [engine.add_request(None, {"prompt_token_ids": r.prompt_token_ids},
                              SamplingParams(temperature=0, max_tokens=decode_steps + 2, ignore_eos=True,
                                             detokenize=False)) for r in requests]
    steps = []
    try:
        for phase in ["prefill"] + ["decode"] * decode_steps:
            with wrap(phase):
                engine.step()
            record = engine.trace[-1]
            expected = sum(len(r.prompt_token_ids) for r in requests) if phase == "prefill" else len(requests)
            if sum(record.scheduled.values()) != expected:
                raise RuntimeError(f"a {phase} step computed {sum(record.scheduled.values())} tokens, not {expected}: "
                                   "the prompts must fit in one step's token budget")
            steps.append((phase, record.duration, record.threads))
    finally:
        for request_id in ids:
            engine.abort(request_id)
        engine.reset_prefix_cache()
    return steps


def profile_steps(llm: LLM, requests: list[Request], decode_steps: int = 4, rounds: int = 1,
                  top: int = 12) -> dict:
    """Profile one prefill step of `requests` and `decode_steps` decode steps after it, `rounds` times, each round
    after a run of the same steps without the profiler (to show its overhead). Per phase: ms per step without and
    with the profiler, the milliseconds of each share, and the top operators by self CPU time."""
    engine = llm.llm_engine
    run_steps(engine, requests, 1, lambda phase: contextlib.nullcontext())   # warm-up
    plain, timed, profiles = [], [], {"prefill": [], "decode": []}

    @contextlib.contextmanager
    def profiled(phase: str) -> Iterator[None]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function(STEP):
                yield
        profiles[phase].append(prof)

    for _ in range(rounds):
        plain += run_steps(engine, requests, decode_steps, lambda phase: contextlib.nullcontext())
        with labelled_stages(engine):
            timed += run_steps(engine, requests, decode_steps, profiled)
    result = {}
    for phase, profs in profiles.items():
        ms = [step_breakdown(p.events()) for p in profs]
        total = {share: sum(m[share] for m in ms) / len(profs) for share in SHARES}   # ms per step
        step_ms = sum(total.values())
        operators: dict[str, dict] = {}
        for prof in profs:
            for row in top_operators(prof, top * 2):
                entry = operators.setdefault(row["name"], {"name": row["name"], "calls": 0, "self_ms": 0.0})
                entry["calls"] += row["calls"]
                entry["self_ms"] += row["self_ms"] / len(profs)
        result[phase] = {
            "steps": len(profs), "tokens_per_step": (sum(len(r.prompt_token_ids) for r in requests)
                                                     if phase == "prefill" else len(requests)),
            "step_ms_without_profiler": 1000 * statistics.median(s for p, s, _ in plain if p == phase),
            "step_ms_with_profiler": 1000 * statistics.median(s for p, s, _ in timed if p == phase),
            "threads": sorted({t for p, _, t in timed if p == phase and t is not None}),
            "ms_per_step": total, "share": {k: v / step_ms for k, v in total.items()},
            "outside_model_forward_share": 1 - (total["matmuls"] + total["attention"] + total["other model ops"])
            / step_ms,
            "top_operators": sorted(operators.values(), key=lambda e: e["self_ms"], reverse=True)[:top],
        }
    return result


def requests_for_one_step(requests: list[Request], budget: int) -> list[Request]:
    """The first requests whose prompts together fit in one step's token budget."""
    chosen, tokens = [], 0
    for r in requests:
        if tokens + len(r.prompt_token_ids) > budget:
            break
        chosen.append(r)
        tokens += len(r.prompt_token_ids)
    return chosen
