"""Benchmark: how max_num_seqs, max_num_batched_tokens and block_size move throughput, TTFT and TPOT, and where
an engine step spends its time.

    python benchmarks/tuning.py --out benchmarks/results/cpu

First, torch.profiler records one prefill step and a few decode steps of an engine on one CPU thread, with each
stage of the step labelled by `torch.profiler.record_function`, in `--profile-rounds` rounds each after the same
steps without the profiler (to show its overhead). The record lists the top operators by self CPU time and splits
the step into matrix multiplications, attention (the C kernel), the model's other operations, sampling, and the
engine's own Python outside the model.

Then one set of corpus requests (`llminfer.bench.serve.random_requests`, greedy, EOS ignored) is submitted at once, as
an offline batch, to engines that differ in one argument each, the others at their defaults (256, 2048, 16). Every
engine gets the same KV cache memory, as engines sharing one GPU's memory would. The engines run `--repeats`
rounds, alternating, so a slow spell of a shared machine hits all of them, each run starting with an empty prefix
cache; the medians are recorded. Per run: output tokens/s, and from each request's `RequestOutput.metrics` its
TTFT (first token - arrival), TPOT ((finished - first token) / (outputs - 1)) and end-to-end latency, summarised
as mean, median, p90 and p99 in ms under vLLM's names. The sweep's engines choose their CPU thread count as they
do for users (`--cpu-threads N` fixes it). Writes `tuning.json` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from llminfer import LLM
from llminfer.bench import serve
from llminfer.bench.record import save_result
from llminfer.bench.tuning import (
    DEFAULTS,
    KV_CACHE_BYTES,
    SHARES,
    SWEEPS,
    corpus_requests,
    profile_steps,
    requests_for_one_step,
    run_sweep,
    sweep_settings,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", default="16:256")
    parser.add_argument("--output-len", default="16:128")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds over all settings")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps profiled after the prefill step")
    parser.add_argument("--profile-rounds", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="fix the sweep's CPU threads (default: the engine measures, as it does for users)")
    parser.add_argument("--out", required=True, help="directory for tuning.json")
    args = parser.parse_args()
    start, load_before = time.perf_counter(), os.getloadavg()
    input_len, output_len = serve.parse_range(args.input_len, "--input-len"), serve.parse_range(args.output_len,
                                                                                               "--output-len")
    # One thread for the profile: an operator's time on the calling thread is then all of its time, and the runs
    # with and without the profiler are not told apart by the thread tuner's probes.
    profiled = LLM(args.model, device="cpu", kv_cache_memory_bytes=KV_CACHE_BYTES, cpu_threads=1)
    requests = corpus_requests(profiled.tokenizer, args.num_prompts, input_len, output_len, args.seed)
    step_requests = requests_for_one_step(requests, DEFAULTS["max_num_batched_tokens"])
    profile = profile_steps(profiled, step_requests, args.decode_steps, args.profile_rounds)
    for phase, p in profile.items():
        print(f"{phase}: {p['tokens_per_step']} tokens, {p['step_ms_without_profiler']:.1f} ms/step "
              f"({p['step_ms_with_profiler']:.1f} profiled): "
              + ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items()))
    del profiled
    settings = sweep_settings(SWEEPS)
    runs = run_sweep(args.model, requests, settings, args.repeats, cpu_threads=args.cpu_threads)
    print(f"{'setting':>32} {'tok/s':>7} {'p90 TTFT ms':>12} {'p90 TPOT ms':>12} {'steps':>6}")
    for run in runs:
        changed = {k: v for k, v in run["setting"].items() if v != DEFAULTS[k]} or "defaults"
        print(f"{changed!s:>32} {run['output_tokens_per_s']:>7.0f} {run['p90_ttft_ms']:>12.0f} "
              f"{run['p90_tpot_ms']:>12.1f} {run['steps']:>6.0f}")
    save_result("tuning", {
        "model": args.model, "device": "cpu", "num_prompts": args.num_prompts, "input_len": list(input_len),
        "output_len": list(output_len), "seed": args.seed, "dataset": "corpus windows (bench serve's random)",
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "requested_output_tokens": sum(r.output_len for r in requests), "repeats": args.repeats,
        "kv_cache_memory_bytes": KV_CACHE_BYTES, "cpu_threads": args.cpu_threads, "defaults": DEFAULTS,
        "sweeps": SWEEPS, "runs": runs,
        "profile": profile | {"requests": len(step_requests), "decode_steps": args.decode_steps, "cpu_threads": 1,
                              "rounds": args.profile_rounds, "shares": SHARES},
        "seconds_total": time.perf_counter() - start,
        # the load while this ran: 1, 5 and 15 minute averages of runnable processes, this one included
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
    }, Path(args.out) / "tuning.json")


if __name__ == "__main__":
    main()
