"""Benchmark: generation with the KV cache against recomputation, on the shipped model.

    python benchmarks/kv_cache.py --json benchmarks/results/cpu/kv_cache.json
"""

import argparse

import torch

import llminfer
from llminfer.bench import kv_cache
from llminfer.bench.record import save_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--totals", default="64,128,256,512,1024", help="total sequence lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", required=True, help="where to write the result")
    args = parser.parse_args()
    model, _ = llminfer.load_model(args.model, device=args.device)
    totals = [int(t) for t in args.totals.split(",")]
    result = kv_cache.run(model, totals, repeats=args.repeats)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    record = save_result("kv_cache", {"model": args.model, "dtype": dtype, **result}, args.json)
    print(f"{'total':>6} {'no cache (s)':>13} {'cache (s)':>10} {'speedup':>8}   on {record['machine']['cpu']}")
    for row in record["rows"]:
        print(f"{row['total_tokens']:>6} {row['no_cache_s']['median']:>13.3f} {row['cache_s']['median']:>10.3f} "
              f"{row['speedup']:>7.1f}x")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
