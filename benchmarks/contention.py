"""Benchmark: offline throughput on a quiet machine and with cores kept busy by another program, side by side.

    python benchmarks/contention.py --out benchmarks/results/cpu

Runs in one process, on the same requests: llminfer with its adaptive CPU thread policy (the default),
llminfer with its threads fixed at torch's count (the policy before it), and transformers `generate()`;
first on the quiet machine, then while `--busy-cores` processes each spin a core (`llminfer.bench.busy`).
In each condition the three run `--repeats` times, in an order that rotates, and the medians are recorded,
with what each kept of its quiet throughput and llminfer's ratio to transformers. Writes `contention.json`.
"""

import argparse
import collections
import statistics
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llminfer import LLM
from llminfer.bench import busy
from llminfer.bench.record import save_result
from llminfer.bench.throughput import (
    MAX_BENCH_SECONDS,
    Request,
    check_arguments,
    parse_range,
    random_requests,
    run_llminfer,
    run_transformers,
    summarize,
)
from llminfer.models.registry import resolve_model_path


def measure(engines: dict, hf, requests: list[Request], batch: int, pad: int, repeats: int) -> dict:
    """Every engine `repeats` times, alternating, on the same requests; medians and each run's seconds."""
    seconds = collections.defaultdict(list)
    outputs, threads = {}, {}
    for llm in engines.values():   # warm-up: first calls pay for allocation and kernel builds
        run_llminfer(llm, [Request(r.prompt_token_ids, 4) for r in requests[:4]])
    run_transformers(hf, [Request(r.prompt_token_ids, 4) for r in requests[:4]], batch, pad)
    names = [*engines, "transformers"]
    for repeat in range(repeats):
        # Rotate the order, so that no engine always runs first (after a long transformers run, say).
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            if name == "transformers":
                elapsed, theirs = run_transformers(hf, requests, batch, pad)
            else:
                llm = engines[name]
                llm.reset_prefix_cache()   # start cold: these prompts ran before
                first = len(llm.llm_engine.trace)
                elapsed, outputs[name] = run_llminfer(llm, requests)
                threads[name] = collections.Counter(r.threads for r in llm.llm_engine.trace[first:])
            seconds[name].append(elapsed)
    result = {}
    for name in engines:
        summary = summarize(requests, outputs[name], theirs, statistics.median(seconds[name]),
                            statistics.median(seconds["transformers"]))
        result[name] = {**summary["llminfer"], "seconds_each_run": seconds[name], "speedup": summary["speedup"],
                        "no_speedup_because": summary["no_speedup_because"],
                        "steps_by_threads": {str(k): v for k, v in sorted(threads[name].items())}}
        result["transformers"] = {**summary["transformers"], "seconds_each_run": seconds["transformers"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="16:256")
    parser.add_argument("--output-len", default="16:256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="also the transformers batch size")
    parser.add_argument("--busy-cores", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="directory for contention.json")
    args = parser.parse_args()
    input_len, output_len = parse_range(args.input_len), parse_range(args.output_len)
    check_arguments(args.model, args.num_prompts, input_len, output_len, args.max_num_seqs, 2048, args.repeats,
                    args.busy_cores, "cpu")
    threads = torch.get_num_threads()
    engines = {"llminfer_adaptive": LLM(args.model, device="cpu", max_num_seqs=args.max_num_seqs, seed=args.seed),
               "llminfer_fixed": LLM(args.model, device="cpu", max_num_seqs=args.max_num_seqs, seed=args.seed,
                                     cpu_threads=threads)}
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).eval()
    tokenizer = engines["llminfer_adaptive"].get_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    requests = random_requests(hf.config.vocab_size, args.num_prompts, input_len, output_len, args.seed)
    conditions = {}
    for cores in (0, args.busy_cores):
        with busy.busy_cores(cores, MAX_BENCH_SECONDS):
            conditions[f"busy_{cores}"] = measure(engines, hf, requests, args.max_num_seqs, pad, args.repeats)
        torch.set_num_threads(threads)
        for name, r in conditions[f"busy_{cores}"].items():
            print(f"busy cores {cores}: {name:18} {r['output_tokens_per_s']:7.0f} tok/s "
                  f"(runs {', '.join(f'{s:.1f}' for s in r['seconds_each_run'])} s)"
                  + (f", {r['speedup']:.2f}x transformers" if r.get("speedup") else ""))
    quiet, loaded = conditions["busy_0"], conditions[f"busy_{args.busy_cores}"]
    kept = {name: loaded[name]["output_tokens_per_s"] / quiet[name]["output_tokens_per_s"] for name in quiet}
    for name, share in kept.items():
        print(f"{name:18} keeps {100 * share:.0f}% of its quiet throughput with {args.busy_cores} core(s) busy")
    save_result("contention", {
        "model": args.model, "device": "cpu", "dtype": "float32", "num_prompts": args.num_prompts,
        "input_len": list(input_len), "output_len": list(output_len), "seed": args.seed,
        "max_num_seqs": args.max_num_seqs, "repeats": args.repeats, "torch_threads": threads,
        "busy_cores": args.busy_cores, "conditions": conditions, "kept_of_quiet": kept,
    }, Path(args.out) / "contention.json")


if __name__ == "__main__":
    main()
