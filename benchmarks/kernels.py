"""Benchmark: the attention kernels of Part II against their torch references.

    python benchmarks/kernels.py                # GPU: the Triton kernels, bf16 -> results/<gpu>/kernels.json
                                                # CPU: the C kernel, fp32 -> results/cpu/kernels.json
    python benchmarks/kernels.py --smoke        # tiny sizes, a check of this script (CPU: Triton's interpreter)

Decode attention and store_kv move memory: each row reports the kernel's achieved GB/s (the bytes
that must move: K/V and q read, the output written) against a measured device copy. Prefill
attention computes: TFLOP/s against a measured matmul. Every row also times the torch reference
on the same inputs, reports the speedup kernel/reference, and the largest difference between them.
"""

import argparse
import math
import os
import re
import time
from functools import partial
from pathlib import Path

import torch

# Without a GPU (--smoke) the kernels run in Triton's interpreter, which must be chosen before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from llminfer.attention import write_kv  # noqa: E402
from llminfer.bench.record import save_result, summarize  # noqa: E402
from llminfer.bench.roofline import measure_copy_bandwidth, measure_matmul_flops  # noqa: E402
from llminfer.kernels import (  # noqa: E402
    cpu,
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_triton,
    paged_attention_prefill,
    paged_attention_prefill_reference,
    paged_attention_prefill_triton,
    store_kv_triton,
)

FULL = dict(batches=[1, 16, 64, 256], contexts=[512, 2048, 8192], store_tokens=[1, 64, 1024, 8192],
            prefill={"1 x 8192 prompt": [(0, 8192)], "4 x 2048 prompts": [(0, 2048)] * 4,
                     "16 x 512 prompts": [(0, 512)] * 16, "512-token chunk after 7680 cached": [(7680, 512)],
                     "mixed: 2 prompts, a chunk, 8 decodes": [(0, 1024)] * 2 + [(3000, 512)] + [(4000, 1)] * 8},
            heads=(32, 8, 128), block_size=16)
# On a CPU: the tiny model's attention shape, and the contexts its engine sees.
CPU = dict(batches=[1, 16, 64, 256], contexts=[128, 512, 1024], store_tokens=[],
           prefill={"1 x 1024 prompt": [(0, 1024)], "4 x 256 prompts": [(0, 256)] * 4,
                    "256-token chunk after 768 cached": [(768, 256)],
                    "mixed: 2 prompts, a chunk, 8 decodes": [(0, 256)] * 2 + [(500, 128)] + [(600, 1)] * 8},
           heads=(8, 2, 32), block_size=16)
SMOKE = dict(batches=[1, 3], contexts=[40], store_tokens=[5],
             prefill={"prompt and chunk": [(0, 20), (12, 7)]}, heads=(4, 2, 32), block_size=16)


def seconds(fn, on_gpu: bool, repeats: int = 7) -> dict:
    """Median and spread of fn's run time: do_bench on a GPU (it flushes L2 between runs), else a wall clock."""
    if on_gpu:
        import triton.testing
        return summarize([ms / 1e3 for ms in triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="all")])
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return summarize(samples)


def side_by_side(kernel, reference, on_gpu: bool, compare: bool = True) -> dict:
    """Time the kernel and its reference on the same inputs; a reference out of GPU memory is recorded as None."""
    row = {"kernel_s": seconds(kernel, on_gpu), "reference_s": None, "speedup": None, "max_abs_error": None}
    try:
        if compare:
            row["max_abs_error"] = (kernel().float() - reference().float()).abs().max().item()
        row["reference_s"] = seconds(reference, on_gpu)
        row["speedup"] = row["reference_s"]["median"] / row["kernel_s"]["median"]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    return row


def kernels(mode: str) -> dict:
    """The kernel timed in each row: Triton (compiled on a GPU, interpreted for --smoke), or C on a CPU."""
    if mode == "cpu":
        # The dispatchers send fp32 CPU tensors to the C kernel (tests/test_cpu_kernel.py checks it).
        return {"decode": paged_attention_decode, "prefill": paged_attention_prefill, "store_kv": None}
    return {"decode": paged_attention_decode_triton, "prefill": paged_attention_prefill_triton,
            "store_kv": store_kv_triton}


def paged_cache(num_blocks: int, sizes: dict, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, sizes["block_size"], sizes["heads"][1], sizes["heads"][2])
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def decode_rows(sizes: dict, dtype: torch.dtype, device: str, kernel) -> list[dict]:
    heads, kv_heads, head_dim = sizes["heads"]
    block_size, itemsize, on_gpu = sizes["block_size"], dtype.itemsize, device == "cuda"
    rows = []
    for batch in sizes["batches"]:
        for context in sizes["contexts"]:
            per_seq = math.ceil(context / block_size)
            k_cache, v_cache = paged_cache(batch * per_seq, sizes, dtype, device)
            tables = torch.randperm(batch * per_seq, device=device).to(torch.int32).view(batch, per_seq)
            seq_lens = torch.full((batch,), context, dtype=torch.long, device=device)
            q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
            args = (q, k_cache, v_cache, tables, seq_lens, head_dim**-0.5, context)
            row = side_by_side(partial(kernel, *args),
                               partial(paged_attention_decode_reference, *args), on_gpu)
            moved = 2 * batch * context * kv_heads * head_dim * itemsize + 2 * q.nbytes
            rows.append({"batch": batch, "context": context, "bytes": moved,
                         "kernel_gb_per_s": moved / row["kernel_s"]["median"] / 1e9, **row})
            del k_cache, v_cache
    return rows


def store_kv_rows(sizes: dict, dtype: torch.dtype, device: str, kernel) -> list[dict]:
    if kernel is None:
        return []
    _, kv_heads, head_dim = sizes["heads"]
    k_cache, v_cache = paged_cache(max(sizes["store_tokens"]) * 2 // sizes["block_size"] + 1, sizes, dtype, device)
    rows = []
    for tokens in sizes["store_tokens"]:
        k, v = torch.randn(2, tokens, kv_heads, head_dim, dtype=dtype, device=device)
        slots = torch.randperm(k_cache.shape[0] * sizes["block_size"], device=device)[:tokens]
        # Both write the same slots (tests/test_kernels.py checks what they write); only time them here.
        row = side_by_side(partial(kernel, k, v, k_cache, v_cache, slots),
                           partial(write_kv, k_cache, v_cache, k, v, slots), device == "cuda", compare=False)
        moved = 2 * (k.nbytes + v.nbytes) + slots.nbytes      # read K/V, write them into the cache
        rows.append({"tokens": tokens, "bytes": moved, "kernel_gb_per_s": moved / row["kernel_s"]["median"] / 1e9,
                     **row})
    return rows


def prefill_rows(sizes: dict, dtype: torch.dtype, device: str, kernel) -> list[dict]:
    heads, kv_heads, head_dim = sizes["heads"]
    block_size = sizes["block_size"]
    rows = []
    for name, seqs in sizes["prefill"].items():
        lens = [cached + new for cached, new in seqs]
        per_seq = [math.ceil(n / block_size) for n in lens]
        k_cache, v_cache = paged_cache(sum(per_seq), sizes, dtype, device)
        order = torch.randperm(sum(per_seq)).tolist()
        tables = [order[sum(per_seq[:i]):sum(per_seq[:i + 1])] for i in range(len(seqs))]
        tables = torch.tensor([t + [-1] * (max(per_seq) - len(t)) for t in tables], dtype=torch.int32, device=device)
        starts = torch.tensor([0] + [sum(new for _, new in seqs[:i + 1]) for i in range(len(seqs))], device=device)
        q = torch.randn(int(starts[-1]), heads, head_dim, dtype=dtype, device=device)
        args = (q, k_cache, v_cache, starts, torch.tensor(lens, device=device), tables, head_dim**-0.5,
                max(new for _, new in seqs), max(lens))
        row = side_by_side(partial(kernel, *args),
                           partial(paged_attention_prefill_reference, *args), device == "cuda")
        # Causal: new token j of a sequence with `cached` tokens before it sees cached + j + 1 keys;
        # q.k and p.v each cost 2 * head_dim FLOPs per head and key.
        keys = sum(new * cached + new * (new + 1) // 2 for cached, new in seqs)
        flops = 4 * heads * head_dim * keys
        rows.append({"name": name, "seqs": seqs, "flops": flops,
                     "kernel_tflop_per_s": flops / row["kernel_s"]["median"] / 1e12, **row})
    return rows


def default_path(mode: str) -> Path:
    where = "cpu" if mode == "cpu" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return Path(__file__).resolve().parent / "results" / where / "kernels.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs without a GPU through the interpreter")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default where supported) or float16")
    parser.add_argument("--json", default=None, help="where to write the result (default: results/<gpu>/kernels.json;"
                                                     " --smoke writes only when given)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    mode = "gpu" if on_gpu else "smoke" if args.smoke else "cpu"
    device = "cuda" if on_gpu else "cpu"
    sizes = {"gpu": FULL, "cpu": CPU, "smoke": SMOKE}[mode]
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = {"gpu": torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16,
                 "cpu": torch.float32, "smoke": torch.float16}[mode]
    if mode == "smoke" and dtype == torch.bfloat16:
        raise SystemExit("Triton's interpreter cannot compute in bfloat16; use --dtype float16 or float32 on CPU")
    if mode == "cpu" and not cpu.supports(torch.zeros(1, 4, 32, dtype=dtype), torch.zeros(1, 1, 1, 32, dtype=dtype)):
        raise SystemExit(f"the C kernel does not run {dtype} here ({cpu.unavailable_reason() or 'fp32 only'})")
    big = mode != "smoke"
    ceilings = {"copy_bytes_per_s": measure_copy_bandwidth(device, nbytes=2**30 if on_gpu else 2**28 if big else 2**24),
                "matmul_flops_per_s": measure_matmul_flops(device, dtype if on_gpu else torch.float32,
                                                           n=8192 if on_gpu else 2048 if big else 256)}
    timed = kernels(mode)
    heads = dict(zip(["num_heads", "num_kv_heads", "head_dim"], sizes["heads"], strict=True))
    result = {"dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke, **heads,
              "block_size": sizes["block_size"], "kernel": "c" if mode == "cpu" else "triton", **ceilings,
              "decode": decode_rows(sizes, dtype, device, timed["decode"]),
              "store_kv": store_kv_rows(sizes, dtype, device, timed["store_kv"]),
              "prefill": prefill_rows(sizes, dtype, device, timed["prefill"])}
    path = args.json or (None if args.smoke else default_path(mode))
    record = save_result("kernels", result, path) if path else {"machine": {"gpu": None, "cpu": device}, **result}
    copy, peak = ceilings["copy_bytes_per_s"] / 1e9, ceilings["matmul_flops_per_s"] / 1e12
    where = record["machine"]["gpu"]["name"] if record["machine"]["gpu"] else record["machine"]["cpu"]
    print(f"{where}, {result['kernel']} kernels, {result['dtype']}: copy {copy:.0f} GB/s, matmul {peak:.2f} TFLOP/s")

    def speedup(row: dict) -> str:
        return f"{row['speedup']:>7.2f}x" if row["speedup"] else "  (OOM)"

    print(f"decode   {'batch':>5} {'context':>7} {'kernel ms':>9} {'GB/s':>7} {'of copy':>7} {'vs torch':>8}")
    for row in result["decode"]:
        print(f"         {row['batch']:>5} {row['context']:>7} {1e3 * row['kernel_s']['median']:>9.3f} "
              f"{row['kernel_gb_per_s']:>7.0f} {row['kernel_gb_per_s'] / copy:>7.0%} {speedup(row)}")
    print(f"store_kv {'tokens':>13} {'kernel ms':>9} {'GB/s':>7} {'of copy':>7} {'vs torch':>8}")
    for row in result["store_kv"]:
        print(f"         {row['tokens']:>13} {1e3 * row['kernel_s']['median']:>9.3f} {row['kernel_gb_per_s']:>7.0f} "
              f"{row['kernel_gb_per_s'] / copy:>7.0%} {speedup(row)}")
    print(f"prefill  {'':>38} {'kernel ms':>9} {'TFLOP/s':>7} {'of peak':>7} {'vs torch':>8}")
    for row in result["prefill"]:
        print(f"         {row['name']:>38} {1e3 * row['kernel_s']['median']:>9.3f} {row['kernel_tflop_per_s']:>7.2f} "
              f"{row['kernel_tflop_per_s'] / peak:>7.0%} {speedup(row)}")
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
