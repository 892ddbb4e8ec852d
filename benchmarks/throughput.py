"""Benchmark: llminfer's engine against transformers `generate()` across batch sizes, on the same requests.

    python benchmarks/throughput.py --out benchmarks/results/cpu

Writes `throughput.json` (the default configuration, as `llminfer bench throughput` records it) and
`throughput_sweep.json` (one result per `max_num_seqs`, which is also the transformers batch size). Each
result is the median of `--repeats` alternating runs of the two engines.
"""

import argparse
from pathlib import Path

from llminfer.bench.record import save_result
from llminfer.bench.throughput import parse_range, run, speedup_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="16:256")
    parser.add_argument("--output-len", default="16:256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", default="32,64,128,256", help="batch sizes; the last is the headline")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of both engines per batch size")
    parser.add_argument("--out", required=True, help="directory for throughput.json and throughput_sweep.json")
    args = parser.parse_args()
    runs = []
    for batch in [int(b) for b in args.max_num_seqs.split(",")]:
        result = run(args.model, args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                     args.seed, max_num_seqs=batch, device=args.device, repeats=args.repeats)
        runs.append(result)
        print(f"max_num_seqs {batch:>4}: llminfer {result['llminfer']['output_tokens_per_s']:7.0f} tok/s, "
              f"transformers {result['transformers']['output_tokens_per_s']:7.0f} tok/s, "
              f"{speedup_text(result)}, identical {result['outputs_agree']['requests_identical']}/{args.num_prompts}")
    out = Path(args.out)
    save_result("throughput", runs[-1], out / "throughput.json")
    save_result("throughput_sweep", {"runs": runs}, out / "throughput_sweep.json")


if __name__ == "__main__":
    main()
