"""Benchmark: what each quantization method costs in quality on the shipped model, and what it saves in bytes.

    python benchmarks/quant_quality.py --json benchmarks/results/cpu/quant_quality.json
    python benchmarks/quant_quality.py --max-chars 2000 --calibration-tokens 512   # a quick check

Every method quantizes a copy of the same float model with the same calibration windows (training split) and
is scored in nats per character on the held-out tenth of tiny Shakespeare (`llminfer.quant.evaluate`). Each
weight-only method's change is also split into an even part (what its error's size costs) and an odd part (what
flips with the error's sign: luck), by scoring the float weights moved the other way as well.
"""

import argparse

import torch

from llminfer.bench.record import save_result
from llminfer.quant.evaluate import evaluate_methods

MEASURED = ("method", "nats_per_char", "decoder_linear_bytes", "model_bytes", "kv_bytes_per_token", "quantize_s",
            "even", "odd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--max-chars", type=int, default=None, help="score only this many held-out characters")
    parser.add_argument("--no-split", action="store_true",
                        help="skip the even/odd split of weight-only methods (one more scoring each)")
    parser.add_argument("--json", default=None, help="where to write the result")
    args = parser.parse_args()
    rows = evaluate_methods(model_name=args.model, calibration_tokens=args.calibration_tokens,
                            max_chars=args.max_chars, split=not args.no_split)
    float_nats = rows[0]["nats_per_char"]
    print(f"{'method':<36} {'nats/char':>10} {'vs float':>9} {'even':>8} {'odd':>8} {'linear KiB':>11} "
          f"{'KV B/token':>10} {'quantize s':>11}")
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in row.items() if k not in MEASURED)
        label = f"{row['method']} {options}".strip()
        even, odd = (f"{row[k]:>+8.4f}" if k in row else f"{'':>8}" for k in ("even", "odd"))
        print(f"{label:<36} {row['nats_per_char']:>10.4f} {row['nats_per_char'] - float_nats:>+9.4f} {even} {odd} "
              f"{row['decoder_linear_bytes'] / 1024:>11.0f} {row['kv_bytes_per_token']:>10} {row['quantize_s']:>11.1f}")
    if args.json:
        save_result("quant_quality", {"model": args.model, "calibration_tokens": args.calibration_tokens,
                                      "max_chars": args.max_chars, "split": not args.no_split, "rows": rows},
                    args.json)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
