"""The `llminfer` command: `generate` a continuation, or check the `env`ironment."""

from __future__ import annotations

import argparse
import sys

from llminfer.grading.cli import add_grade_parser


def _generate(args: argparse.Namespace) -> int:
    from llminfer.generate import generate
    from llminfer.models.loader import load_model
    from llminfer.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens,
    )
    if not args.prompt:
        raise ValueError("prompt is empty: give at least one character with --prompt")
    model, tokenizer = load_model(args.model, device=args.device)
    result = generate(model, tokenizer, args.prompt, params)
    print((args.prompt if args.echo else "") + result.text)
    return 0


def _bench_throughput(args: argparse.Namespace) -> int:
    from llminfer.bench.record import save_result
    from llminfer.bench.throughput import parse_range, run, speedup_text

    result = run(args.model, args.num_prompts, parse_range(args.input_len), parse_range(args.output_len), args.seed,
                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                 device=args.device, dtype=args.dtype, repeats=args.repeats, busy_cores=args.busy_cores)
    if args.json:
        save_result("throughput", result, args.json)
    print(f"{result['num_prompts']} requests, {result['requested_output_tokens']} output tokens requested, "
          f"on {result['device']} (busy cores: {result['busy_cores']})")
    runs = f", median of {result['repeats']} alternating runs" if result["repeats"] > 1 else ""
    for name in ("llminfer", "transformers"):
        engine = result[name]
        print(f"{name:12}  {engine['output_tokens_per_s']:10.1f} output tokens/s  "
              f"({engine['output_tokens']} tokens in {engine['seconds']:.2f} s{runs})")
    agree = result["outputs_agree"]
    token_agreement = "n/a" if agree["token_agreement"] is None else f"{agree['token_agreement']:.4f}"
    print(f"{speedup_text(result)}; identical outputs {agree['requests_identical']}/{agree['requests']}, "
          f"token agreement {token_agreement}")
    return 0


def _env(args: argparse.Namespace) -> int:
    from llminfer.environment import report

    lines, ok = report()
    print("\n".join(lines))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llminfer", description="The companion engine of the LLM inference book.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt with a model")
    gen.add_argument("--model", default="tiny-shakespeare", help="shipped name, local directory or Hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 disables")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU if present)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    gen.set_defaults(run=_generate)
    bench = sub.add_parser("bench", help="benchmarks against a baseline").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="offline throughput of llminfer.LLM vs transformers generate()")
    tp.add_argument("--model", default="tiny-shakespeare")
    tp.add_argument("--num-prompts", type=int, default=256)
    tp.add_argument("--input-len", default="16:256", help="prompt lengths, uniform in A:B")
    tp.add_argument("--output-len", default="16:256", help="output lengths, uniform in C:D")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--max-num-seqs", type=int, default=256, help="also the transformers batch size")
    tp.add_argument("--max-num-batched-tokens", type=int, default=2048)
    tp.add_argument("--device", default=None)
    tp.add_argument("--dtype", default="auto")
    tp.add_argument("--repeats", type=int, default=1, help="run both this many times, alternating; report medians")
    tp.add_argument("--busy-cores", type=int, default=0, help="keep this many cores busy while the engines run")
    tp.add_argument("--json", default=None, help="write the result, with the machine, to this file")
    tp.set_defaults(run=_bench_throughput)
    env = sub.add_parser("env", help="check dependencies, the device and how Triton kernels would run")
    env.set_defaults(run=_env)
    add_grade_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:   # a user's mistake: a bad value, a missing or unreadable file
        print(f"llminfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
