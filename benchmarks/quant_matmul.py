"""Benchmark: torch's CPU kernels for quantized matmuls against dequantize-then-matmul and the fp32 matmul.

    python benchmarks/quant_matmul.py --json benchmarks/results/cpu/quant_matmul.json
    python benchmarks/quant_matmul.py --shapes llama-7b --tokens 1,4,16,32 \
        --json benchmarks/results/cpu/quant_matmul_llama7b.json
    python benchmarks/quant_matmul.py --smoke      # tiny repeat counts, a check of this script

For each linear layer shape (`--shapes`: the shipped model's, hidden 256 and intermediate 768; Llama-7B's, hidden
4096 and intermediate 11008; or both) and each batch of tokens, times on the same inputs: fp32 `F.linear`;
weight-only int8 (`_weight_int8pack_mm`) and int4 g128/g32 (`_weight_int4pack_mm_for_cpu`), each against its
reference (dequantize, then `F.linear`); and W8A8's int8 x int8 -> int32 product (`_int_mm`) against the exact
int32 matmul. The weight-only kernels run three ways: on fp32 activations as given (`int8 kernel`), on bf16
activations (`... kernel bf16`, against bf16 `F.linear`), and on fp32 activations rounded to bf16 and the result
cast back (`... kernel fp32->bf16`), which is what llminfer's layers do (`cpu_kernel_dtype` in
llminfer/kernels/quant_matmul.py). The ratios say which path a layer should take at which batch size
(`WEIGHT_ONLY_MAX_TOKENS` there). The fp32-activation kernels are scalar loops in torch 2.13: at Llama-7B's
shapes and hundreds of tokens they take seconds a call.
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

SHAPES = {   # model: {layer name: (out, in)}
    "shipped": {"q_proj/o_proj": (256, 256), "k_proj/v_proj": (64, 256), "gate_proj/up_proj": (768, 256),
                "down_proj": (256, 768)},
    "llama-7b": {"q_proj/k_proj/v_proj/o_proj": (4096, 4096), "gate_proj/up_proj": (11008, 4096),
                 "down_proj": (4096, 11008)},
}
WEIGHT_ONLY = ("int8", "int4 g128", "int4 g32")
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


def to_bf16_and_back(kernel):
    """`kernel` on fp32 activations rounded to bf16, the result cast back to fp32: llminfer's CPU path."""
    def call(x, *operands):
        return kernel(x.to(torch.bfloat16), *operands).float()
    return call


def run(tokens_list: list[int], repeats: int, models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        for name, (out_features, in_features) in SHAPES[model].items():
            weight = torch.randn(out_features, in_features) / in_features**0.5
            weight_bf16 = weight.to(torch.bfloat16)
            codes8, scales8 = quantize_int8(weight)
            int4 = {g: quantize_int4(weight, g) for g in (128, 32)}
            packed = {(g, dtype): pack_int4_for_cpu(q.codes, q.scales, q.zeros, dtype)
                      for g, q in int4.items() for dtype in (torch.float32, torch.bfloat16)}
            for tokens in tokens_list:
                x = torch.randn(tokens, in_features)
                x_bf16 = x.to(torch.bfloat16)
                x8 = torch.randint(-127, 128, (tokens, in_features), dtype=torch.int8)
                contenders = {   # label: (function, arguments)
                    "fp32 F.linear": (F.linear, (x, weight)),
                    "int8 kernel": (int8_weight_matmul, (x, codes8, scales8)),
                    "int8 reference": (int8_weight_matmul_reference, (x, codes8, scales8)),
                    "w8a8 _int_mm": (int8_matmul, (x8, codes8)),
                    "w8a8 int32 reference": (int8_matmul_reference, (x8, codes8)),
                    "bf16 F.linear": (F.linear, (x_bf16, weight_bf16)),
                    "int8 kernel bf16": (int8_weight_matmul, (x_bf16, codes8, scales8)),
                    "int8 kernel fp32->bf16": (to_bf16_and_back(int8_weight_matmul), (x, codes8, scales8)),
                }
                for g, q in int4.items():
                    fp32_operands, bf16_operands = packed[g, torch.float32], packed[g, torch.bfloat16]
                    contenders[f"int4 g{g} kernel"] = (int4_weight_matmul, (x, fp32_operands[0], g, fp32_operands[1]))
                    contenders[f"int4 g{g} reference"] = (int4_weight_matmul_reference,
                                                          (x, q.codes, q.scales, q.zeros, g))
                    contenders[f"int4 g{g} kernel bf16"] = (int4_weight_matmul,
                                                            (x_bf16, bf16_operands[0], g, bf16_operands[1]))
                    contenders[f"int4 g{g} kernel fp32->bf16"] = (to_bf16_and_back(int4_weight_matmul),
                                                                  (x, bf16_operands[0], g, bf16_operands[1]))
                times = {label: seconds(fn, args, repeats) for label, (fn, args) in contenders.items()}
                median = {label: t["median"] for label, t in times.items()}
                row = {"model": model, "layer": name, "out": out_features, "in": in_features, "tokens": tokens,
                       "seconds": times, "vs_fp32": {label: median["fp32 F.linear"] / t for label, t in median.items()},
                       # the bf16-activation contenders against the matmul of the same activations on a bf16 weight
                       "vs_bf16": {label: median["bf16 F.linear"] / t for label, t in median.items()
                                   if label.endswith(" bf16")}}
                for kind in WEIGHT_ONLY:
                    row[f"{kind} kernel vs reference"] = median[f"{kind} reference"] / median[f"{kind} kernel"]
                    # how much faster the kernel runs on bf16 activations, casts included, than on fp32 ones
                    row[f"{kind} kernel fp32->bf16 vs fp32 activations"] = (median[f"{kind} kernel"]
                                                                            / median[f"{kind} kernel fp32->bf16"])
                row["_int_mm vs int32 reference"] = median["w8a8 int32 reference"] / median["w8a8 _int_mm"]
                rows.append(row)
                print(f"{name:>18} {tokens:>4} tokens  " + "  ".join(
                    f"{label} {t['median'] * 1e6:.0f}us" for label, t in times.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--shapes", choices=[*SHAPES, "all"], default="shipped",
                        help="layer shapes: the shipped model's, Llama-7B's, or both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="where to write the result")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [1, 3] if args.smoke else [int(t) for t in args.tokens.split(",")]
    models = list(SHAPES) if args.shapes == "all" else [args.shapes]
    rows = run(tokens, 2 if args.smoke else args.repeats, models)
    if args.json:
        save_result("quant_matmul", {"dtype": "float32", "activation_dtypes": ["float32", "bfloat16"],
                                     "shapes": models, "rows": rows}, args.json)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
