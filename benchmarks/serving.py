"""Benchmark: the HTTP server against the offline engine on the same requests, and what a request pays at low load.

    python benchmarks/serving.py --out benchmarks/results/cpu

1. Saturation. The same requests (corpus prompts, exact output lengths, greedy, `ignore_eos`) go to the offline
   `LLM.generate` in this process and, all at once, to two `llminfer serve` child processes, one with its engine
   loop in a process of its own (`--engine-core process`, the default) and one with it in a thread of the server
   (`--engine-core thread`), streamed (through `llminfer bench serve`'s client, an event per token) and as whole
   answers. Each repeat draws a new request set (so no run is helped by the prefix cache of the one before)
   and runs all five, in rotating order. Reported: output tokens/s of each, the server's share of the offline
   throughput, and the CPU seconds the client (this process) and the server (with its engine process) used,
   since on a small machine they share the cores.
2. Low load. One request at a time, a prompt of `--ttft-prompt-len` tokens and one output token: the client's
   time to first token beside the server's own (its TTFT histogram on /metrics, arrival in the engine to first
   token: queueing and the prefill step, no HTTP); the difference is what the HTTP layer adds. For scale, the
   offline engine's prefill step for the same prompts and an HTTP round trip (GET /health).

Writes `serving.json`.
"""

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx

from llminfer import LLM, SamplingParams
from llminfer.bench.record import save_result, summarize
from llminfer.bench.serve import BenchRequest, benchmark, build_requests, parse_range
from llminfer.datasets import tinyshakespeare_text
from llminfer.serve.launch import ServerProcess

MODEL = "tiny-shakespeare"


def offline_run(llm: LLM, requests: list[BenchRequest]) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True, detokenize=True)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds}


def server_run(url: str, requests: list[BenchRequest], stream: bool = True) -> dict:
    """All requests at once through the server: streamed (`llminfer bench serve`'s client, an event per token)
    or not (one JSON answer per request)."""
    if stream:
        results, seconds = asyncio.run(benchmark(url, MODEL, requests, [0.0] * len(requests), None, 600.0))
        failed = [r.error for r in results if not r.success]
        tokens = sum(r.output_tokens or 0 for r in results)
    else:
        async def whole() -> tuple[list, float]:
            async with httpx.AsyncClient(trust_env=False, timeout=600,
                                         limits=httpx.Limits(max_connections=None)) as client:
                start = time.perf_counter()
                answers = await asyncio.gather(*[client.post(f"{url}/v1/completions", json={
                    "model": MODEL, "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0,
                    "ignore_eos": True}) for r in requests], return_exceptions=True)
                return answers, time.perf_counter() - start

        answers, seconds = asyncio.run(whole())
        ok = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
        failed = [repr(a)[:200] for a in answers if a not in ok]
        tokens = sum(a.json()["usage"]["completion_tokens"] for a in ok)
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "failed": len(failed), "errors": sorted(set(failed))[:3]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its children (the engine process) have used so far (Linux /proc)."""
    def own(stat: str) -> tuple[int, float]:
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    total = own(Path(f"/proc/{pid}/stat").read_text())[1]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent, seconds = own(stat.read_text())
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            total += seconds
    return total


def server_ttft(url: str) -> tuple[float, float]:
    """The server's own TTFT histogram (arrival in the engine to first token): its (sum of seconds, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", trust_env=False).text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return (values.get("vllm:time_to_first_token_seconds_sum", 0.0),
            values.get("vllm:time_to_first_token_seconds_count", 0.0))


def low_load(llm: LLM, url: str, tokenizer, prompt_len: int, count: int) -> dict:
    """One request at a time: the client's TTFT, the server's own TTFT for the same requests (from /metrics: the
    engine's queueing and prefill, no HTTP), the offline engine's prefill step for the same prompts, and an HTTP
    round trip. Client minus server TTFT is what the HTTP layer adds."""
    requests = build_requests(tokenizer, tinyshakespeare_text(), "random", count, (prompt_len, prompt_len),
                              (1, 1), 0, 1, seed=123)
    ttft = []
    sum_before, count_before = server_ttft(url)
    with httpx.Client(trust_env=False, timeout=60) as client:   # one connection, kept open, as a real client does
        for request in requests:
            body = {"model": MODEL, "prompt": request.prompt, "max_tokens": 1, "temperature": 0, "stream": True}
            start = time.perf_counter()
            with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                first = None
                for line in response.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - start
            ttft.append(first)
    sum_after, count_after = server_ttft(url)
    llm.reset_prefix_cache()
    engine = llm.llm_engine
    prefill = []
    for request in requests:
        before = len(engine.trace)
        llm.generate(request.prompt, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        prefill.extend(step.duration for step in engine.trace[before:])
        llm.reset_prefix_cache()
    with httpx.Client(trust_env=False) as client:
        client.get(f"{url}/health")
        round_trips = []
        for _ in range(50):
            start = time.perf_counter()
            client.get(f"{url}/health")
            round_trips.append(time.perf_counter() - start)
    mean_ms = {"client_ttft": statistics.mean(ttft) * 1e3,
               "server_ttft": (sum_after - sum_before) / (count_after - count_before) * 1e3}
    median_ms = {name: statistics.median(values) * 1e3 for name, values in
                 (("client_ttft", ttft), ("offline_prefill_step", prefill), ("http_round_trip", round_trips))}
    return {"prompt_len": prompt_len, "requests": count, "mean_ms": mean_ms, "median_ms": median_ms,
            "http_layer_ms": mean_ms["client_ttft"] - mean_ms["server_ttft"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="16:256")
    parser.add_argument("--output-len", default="16:256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft-prompt-len", type=int, default=128)
    parser.add_argument("--ttft-requests", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()
    input_len, output_len = parse_range(args.input_len, "--input-len"), parse_range(args.output_len, "--output-len")

    llm = LLM(MODEL, device="cpu")
    tokenizer = llm.get_tokenizer()
    servers = {core: ServerProcess(MODEL, "--device", "cpu", "--engine-core", core) for core in ("process", "thread")}
    try:
        warm = build_requests(tokenizer, tinyshakespeare_text(), "random", 16, input_len, (8, 8), 0, 1, seed=999)
        offline_run(llm, warm)
        for server in servers.values():
            server_run(server.url, warm)
        runs = {"offline": [], **{f"{core}_{mode}": [] for core in servers for mode in ("streamed", "whole")}}
        for repeat in range(args.repeats):
            requests = build_requests(tokenizer, tinyshakespeare_text(), "random", args.num_prompts, input_len,
                                      output_len, 0, 1, seed=repeat)
            names = list(runs)
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:   # rotate who goes first
                client_cpu = time.process_time()
                if name == "offline":
                    run = offline_run(llm, requests)
                    run["cpu_seconds"] = {"engine": time.process_time() - client_cpu}
                else:
                    core, mode = name.split("_")
                    server = servers[core]
                    server_cpu = cpu_seconds(server.proc.pid)
                    run = server_run(server.url, requests, stream=mode == "streamed")
                    run["cpu_seconds"] = {"client": time.process_time() - client_cpu,
                                          "server": cpu_seconds(server.proc.pid) - server_cpu}
                runs[name].append(run)
                print(f"repeat {repeat} {name:16} {run['output_tokens_per_s']:8.1f} output tokens/s "
                      f"({run['output_tokens']} tokens in {run['seconds']:.2f} s)", flush=True)
        ttft = {core: low_load(llm, server.url, tokenizer, args.ttft_prompt_len, args.ttft_requests)
                for core, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    def median(name: str) -> float:
        return statistics.median(r["output_tokens_per_s"] for r in runs[name])

    result = {
        "model": MODEL, "num_prompts": args.num_prompts, "input_len": list(input_len), "output_len": list(output_len),
        "repeats": args.repeats,
        "saturation": {name: {"output_tokens_per_s": summarize([r["output_tokens_per_s"] for r in runs[name]]),
                              "runs": runs[name]} for name in runs},
        "over_offline": {name: median(name) / median("offline") for name in runs if name != "offline"},
        "low_load": ttft,
    }
    for name, ratio in result["over_offline"].items():
        print(f"{name:16} {ratio:.3f} of the offline output throughput")
    for core, low in ttft.items():
        print(f"low load, engine in a {core}, {low['prompt_len']}-token prompts: client TTFT "
              f"{low['mean_ms']['client_ttft']:.2f} ms, the server's own {low['mean_ms']['server_ttft']:.2f} ms "
              f"(means): the HTTP layer adds {low['http_layer_ms']:.2f} ms; an offline prefill step takes "
              f"{low['median_ms']['offline_prefill_step']:.2f} ms, a round trip "
              f"{low['median_ms']['http_round_trip']:.2f} ms (medians)")
    save_result("serving", result, Path(args.out) / "serving.json")


if __name__ == "__main__":
    main()
