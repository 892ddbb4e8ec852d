"""The `llminfer` command: `generate` a continuation, or check the `env`ironment."""

from __future__ import annotations

import argparse
import json
import sys

from llminfer.bench.serve import add_parser as add_bench_serve_parser
from llminfer.grading.cli import add_grade_parser
from llminfer.serve.batch import add_engine_arguments
from llminfer.serve.batch import add_parser as add_run_batch_parser


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
    if args.speculative_config is not None or args.quantization is not None or args.kv_cache_dtype != "auto":
        # these live in the engine
        from llminfer.engine.llm import LLM

        spec = None if args.speculative_config is None else _json_object(args.speculative_config,
                                                                          "--speculative-config")
        llm = LLM(args.model, device=args.device, speculative_config=spec, quantization=args.quantization,
                  kv_cache_dtype=args.kv_cache_dtype)
        text = llm.generate(args.prompt, params, use_tqdm=False)[0].outputs[0].text
        stats = llm.llm_engine.spec_stats
        if stats.num_verifications:
            print(f"speculation: {stats.num_accepted} of {stats.num_drafted} drafted tokens accepted, "
                  f"{stats.mean_accepted_length:.2f} tokens per step", file=sys.stderr)
    else:
        model, tokenizer = load_model(args.model, device=args.device)
        text = generate(model, tokenizer, args.prompt, params).text
    print((args.prompt if args.echo else "") + text)
    return 0


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON ({exc}): {text!r:.100}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object {{...}}, got {text!r:.100}")
    return value


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


def _bench_spec(args: argparse.Namespace) -> int:
    from llminfer.bench.record import save_result
    from llminfer.bench.spec import run

    result = run(args.model, args.draft_model, batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                 ks=_ints(args.k, "--k"), ks_batched=_ints(args.k_batched, "--k-batched"),
                 workloads=tuple(args.workloads.split(",")), proposers=tuple(args.proposers.split(",")),
                 output_len=args.output_len, repeats=args.repeats)
    if args.json:
        save_result("spec", result, args.json)
    return 0


def _bench_quant(args: argparse.Namespace) -> int:
    from llminfer.bench.quant import format_table, run
    from llminfer.bench.record import save_result
    from llminfer.bench.throughput import parse_range

    result = run(args.model, tuple(args.configs.split(",")), num_prompts=args.num_prompts,
                 input_len=parse_range(args.input_len), output_len=parse_range(args.output_len),
                 decode_tokens=args.decode_tokens, repeats=args.repeats, seed=args.seed,
                 kv_cache_memory_bytes=args.kv_cache_memory_bytes, skip_throughput=args.skip_throughput,
                 device=args.device, log=lambda line: print(line, file=sys.stderr))
    if args.json:
        save_result("quant", result, args.json)
    print(format_table(result))
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4), each at least 1."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} values must be at least 1, got {text!r}")
    return values


def _serve(args: argparse.Namespace) -> int:
    from llminfer.serve.batch import engine_kwargs
    from llminfer.serve.server import serve

    serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
          log_level=args.log_level, engine_core=args.engine_core, **engine_kwargs(args))
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
    gen.add_argument("--speculative-config", default=None,
                     help='vLLM\'s JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' or '
                          '\'{"model": "tiny-shakespeare-draft", "num_speculative_tokens": 3}\'')
    gen.add_argument("--quantization", default=None,
                     help="quantize the decoder's linear layers as the model loads: int8, int4, fp8, gptq, awq, w8a8")
    gen.add_argument("--kv-cache-dtype", default="auto",
                     help="store the KV cache quantized: int8, fp8 (= fp8_e4m3), fp8_e5m2; auto keeps the model's")
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
    sp = bench.add_parser("spec", help="speculative decoding against plain decoding, beside the classic formula")
    sp.add_argument("--model", default="tiny-shakespeare")
    sp.add_argument("--draft-model", default="tiny-shakespeare-draft")
    sp.add_argument("--batch-sizes", default="1,4,16,64")
    sp.add_argument("--k", default="1,2,3,4,5,6,7,8", help="draft lengths at batch size 1")
    sp.add_argument("--k-batched", default="1,2,4,8", help="draft lengths at the larger batch sizes")
    sp.add_argument("--workloads", default="grounded,open")
    sp.add_argument("--proposers", default="ngram,draft_model")
    sp.add_argument("--output-len", type=int, default=128)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--json", default=None, help="write the result, with the machine, to this file")
    sp.set_defaults(run=_bench_spec)
    qp = bench.add_parser("quant", help="quantized weights and KV cache against float: batch-1 decode and throughput")
    qp.add_argument("--model", default="tiny-shakespeare")
    qp.add_argument("--configs", default="float,int8,int4,w8a8,kv-int8,int8+kv-int8",
                    help="weights (float, int8, int4, fp8, gptq, awq, w8a8), kv-<dtype>, or both joined by +; "
                         "float, the baseline, is always measured")
    qp.add_argument("--num-prompts", type=int, default=256)
    qp.add_argument("--input-len", default="16:256", help="throughput prompt lengths, uniform in A:B")
    qp.add_argument("--output-len", default="16:256", help="throughput output lengths, uniform in C:D")
    qp.add_argument("--decode-tokens", type=int, default=128, help="tokens generated by the batch-1 decode")
    qp.add_argument("--repeats", type=int, default=3, help="runs of each workload, configurations alternating")
    qp.add_argument("--seed", type=int, default=0)
    qp.add_argument("--kv-cache-memory-bytes", type=int, default=2**28, help="every engine's KV cache budget")
    qp.add_argument("--skip-throughput", action="store_true", help="batch-1 decode only (for large models)")
    qp.add_argument("--device", default="cpu")
    qp.add_argument("--json", default=None, help="write the result, with the machine, to this file")
    qp.set_defaults(run=_bench_quant)
    add_bench_serve_parser(bench)
    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (vLLM's `vllm serve`)")
    srv.add_argument("model", nargs="?", default="tiny-shakespeare", help="shipped name, local directory or Hub id")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: MODEL)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--engine-core", choices=["process", "thread"], default="process",
                     help="run the engine loop in a child process (default, as vLLM V1 does) or in a thread of the "
                          "server's process")
    add_engine_arguments(srv)
    srv.set_defaults(run=_serve)
    add_run_batch_parser(sub)
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
