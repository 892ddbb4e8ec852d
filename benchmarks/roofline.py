"""Benchmark: the machine's measured ceilings and a model's forward passes placed under them.

    python benchmarks/roofline.py --json benchmarks/results/<machine>/roofline.json

Prefill passes of several lengths, batch-1 decode steps at several contexts, and batched decode
steps, each timed with the KV cache as `generate_tokens` runs it; the chapter "The performance
model" plots every record whose machine has a GPU.
"""

import argparse

import torch

import llminfer
from llminfer.bench import roofline
from llminfer.bench.record import save_result


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--prefill", default="16,64,256,1024", help="prompt lengths")
    parser.add_argument("--contexts", default="16,256,1023", help="context lengths of batch-1 decode steps")
    parser.add_argument("--batches", default="4,16,64,256", help="batch sizes of decode steps at context 256")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", required=True, help="where to write the result")
    args = parser.parse_args()
    model, _ = llminfer.load_model(args.model, device=args.device)
    param = next(model.parameters())
    on_gpu = param.device.type == "cuda"
    peak = roofline.measure_matmul_flops(param.device, param.dtype, n=8192 if on_gpu else 2048)
    bandwidth = roofline.measure_copy_bandwidth(param.device, nbytes=2**30 if on_gpu else 2**28)
    passes = ([(n, 0, 1) for n in numbers(args.prefill)] + [(1, c, 1) for c in numbers(args.contexts)]
              + [(1, 256, b) for b in numbers(args.batches)])
    points = roofline.measure_points(model, passes, repeats=args.repeats)
    dtype = str(param.dtype).removeprefix("torch.")
    record = save_result("roofline", {"model": args.model, "dtype": dtype, "peak_flops": peak, "bandwidth": bandwidth,
                                      "points": points}, args.json)
    gpu = record["machine"]["gpu"]
    print(f"{gpu['name'] if gpu else record['machine']['cpu']}: {peak / 1e12:.2f} TFLOP/s ({dtype} matmul), "
          f"{bandwidth / 1e9:.0f} GB/s (copy), ridge {peak / bandwidth:.1f} FLOP/byte")
    print(f"{'new':>5} {'context':>7} {'batch':>5} {'FLOP/byte':>9} {'ms':>8} {'TFLOP/s':>8} {'of roof':>7}")
    for p in points:
        roof = roofline.attainable(p["intensity"], peak, bandwidth)
        print(f"{p['num_new_tokens']:>5} {p['context_len']:>7} {p['batch_size']:>5} {p['intensity']:>9.2f} "
              f"{1e3 * p['seconds']['median']:>8.3f} {p['flops_per_s'] / 1e12:>8.4f} {p['flops_per_s'] / roof:>7.1%}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
