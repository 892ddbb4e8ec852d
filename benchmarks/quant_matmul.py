"""Benchmark: torch's CPU kernels for quantized matmuls against dequantize-then-matmul and the fp32 matmul.

    python benchmarks/quant_matmul.py --json benchmarks/results/cpu/quant_matmul.json
    python benchmarks/quant_matmul.py --smoke      # tiny repeat counts, a check of this script

For each linear layer shape of the shipped model (hidden 256, intermediate 768) and each batch of tokens,
times on the same inputs: fp32 `F.linear`; weight-only int8 (`_weight_int8pack_mm`) and int4 g128/g32
(`_weight_int4pack_mm_for_cpu`), each against its reference (dequantize, then `F.linear`); and W8A8's int8 x
int8 -> int32 product (`_int_mm`) against the exact int32 matmul. The ratios say which path a layer should
take at which batch size (`WEIGHT_ONLY_MAX_TOKENS` in llminfer/kernels/quant_matmul.py).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from llminfer.bench.record import save_result, summarize
from llminfer.kernels.quant_matmul import (
    int4_weight_matmul,
    int4_weight_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    int8_weight_matmul,
    int8_weight_matmul_reference,
    pack_int4_for_cpu,
)
from llminfer.quant.formats import quantize_int4, quantize_int8

SHAPES = {"q_proj/o_proj": (256, 256), "k_proj/v_proj": (64, 256), "gate_proj/up_proj": (768, 256),
          "down_proj": (256, 768)}   # name: (out, in)
TOKENS = [1, 4, 16, 32, 64, 256]


def seconds(fn, args: tuple, repeats: int, min_time: float = 0.01) -> dict:
    """Median and spread of one call fn(*args); each sample averages enough calls to last `min_time`."""
    fn(*args)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        if time.perf_counter() - start >= min_time:
            break
        calls *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        samples.append((time.perf_counter() - start) / calls)
    return summarize(samples)


def run(tokens_list: list[int], repeats: int) -> list[dict]:
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features) / in_features**0.5
        codes8, scales8 = quantize_int8(weight)
        int4 = {g: quantize_int4(weight, g) for g in (128, 32)}
        packed = {g: pack_int4_for_cpu(q.codes, q.scales, q.zeros, torch.float32) for g, q in int4.items()}
        for tokens in tokens_list:
            x = torch.randn(tokens, in_features)
            x8 = torch.randint(-127, 128, (tokens, in_features), dtype=torch.int8)
            contenders = {   # label: (function, arguments)
                "fp32 F.linear": (F.linear, (x, weight)),
                "int8 kernel": (int8_weight_matmul, (x, codes8, scales8)),
                "int8 reference": (int8_weight_matmul_reference, (x, codes8, scales8)),
                "w8a8 _int_mm": (int8_matmul, (x8, codes8)),
                "w8a8 int32 reference": (int8_matmul_reference, (x8, codes8)),
            }
            for g, q in int4.items():
                contenders[f"int4 g{g} kernel"] = (int4_weight_matmul, (x, packed[g][0], g, packed[g][1]))
                contenders[f"int4 g{g} reference"] = (int4_weight_matmul_reference, (x, q.codes, q.scales, q.zeros, g))
            times = {label: seconds(fn, args, repeats) for label, (fn, args) in contenders.items()}
            fp32 = times["fp32 F.linear"]["median"]
            row = {"layer": name, "out": out_features, "in": in_features, "tokens": tokens, "seconds": times,
                   "vs_fp32": {label: fp32 / t["median"] for label, t in times.items()}}
            for kind in ("int8", "int4 g128", "int4 g32"):
                row[f"{kind} kernel vs reference"] = (times[f"{kind} reference"]["median"]
                                                      / times[f"{kind} kernel"]["median"])
            row["_int_mm vs int32 reference"] = (times["w8a8 int32 reference"]["median"]
                                                 / times["w8a8 _int_mm"]["median"])
            rows.append(row)
            print(f"{name:>18} {tokens:>4} tokens  " + "  ".join(
                f"{label} {t['median'] * 1e6:.0f}us" for label, t in times.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="where to write the result")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [1, 3] if args.smoke else [int(t) for t in args.tokens.split(",")]
    rows = run(tokens, 2 if args.smoke else args.repeats)
    if args.json:
        save_result("quant_matmul", {"dtype": "float32", "rows": rows}, args.json)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
