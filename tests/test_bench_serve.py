"""`llminfer bench serve`: its metric math against hand-computed values and numpy, arrival times with the gamma's
mean and spread, the three datasets cut from the corpus, bad values refused by name, and whole runs against a fake
streaming OpenAI-style server (FastAPI under uvicorn on a thread) that also fails requests in every way it can."""

import argparse
import asyncio
import json
import math
import re
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llminfer.bench import serve as bench
from llminfer.bench.record import save_result
from llminfer.datasets import tinyshakespeare_text
from llminfer.serve.launch import free_port

FIRST_DELAY = 0.05    # the fake server's seconds before its first chunk
GAP = 0.02            # and between chunks (one token each)
HANG = 3.0            # seconds a hanging stream waits before finishing (longer than the tests' timeouts)
FLAKY_KINDS = ("ok", "http500", "broken", "no_done", "hang")

# ---------------------------------------------------------------- the fake server

app = FastAPI()
calls: Counter = Counter()       # requests seen per model name
in_flight: Counter = Counter()
peak: Counter = Counter()        # most requests in flight at once per model name
received: list[dict] = []        # every request body


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    received.append(body)
    model, tokens = body["model"], int(body["max_tokens"])
    kind = FLAKY_KINDS[calls[model] % len(FLAKY_KINDS)] if model == "flaky" else "ok"
    calls[model] += 1
    if kind == "http500":
        return JSONResponse({"error": {"message": "the fake server fails this one"}}, status_code=500)

    async def events():
        in_flight[model] += 1
        peak[model] = max(peak[model], in_flight[model])
        try:
            await asyncio.sleep(FIRST_DELAY)
            for i in range(tokens):
                if i:
                    await asyncio.sleep(GAP)
                if kind == "broken" and i == 1:
                    raise RuntimeError("the fake server breaks this stream")
                yield _event({"choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]})
            if kind == "no_done":
                return
            if kind == "hang":
                await asyncio.sleep(HANG)
            yield _event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            yield _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens,
                                                   "total_tokens": 7 + tokens}})
            yield "data: [DONE]\n\n"
        finally:
            in_flight[model] -= 1

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def server():
    """The fake server on 127.0.0.1 at a free port, on a background thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="critical", lifespan="off", timeout_graceful_shutdown=2)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    instance.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def tokenizer():
    from llminfer.models.loader import load_tokenizer
    from llminfer.models.registry import resolve_model_path

    return load_tokenizer(resolve_model_path("tiny-shakespeare"))


@pytest.fixture(scope="module")
def corpus():
    return tinyshakespeare_text()


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments as `llminfer bench serve ARGV` would parse them."""
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="bench", required=True))
    return parser.parse_args(["serve", *argv])


def strict_json(text: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0],
                                    list(np.random.default_rng(1).exponential(size=101))])
def test_percentiles_interpolate_like_numpy(values):
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_latency_stats_are_in_ms_under_vllm_keys_and_none_when_empty():
    stats = bench.latency_stats("ttft", [0.010, 0.020, 0.030, 0.040])
    assert stats == pytest.approx({"mean_ttft_ms": 25.0, "median_ttft_ms": 25.0, "p90_ttft_ms": 37.0,
                                   "p99_ttft_ms": 39.7})
    assert bench.latency_stats("itl", []) == dict.fromkeys(["mean_itl_ms", "median_itl_ms", "p90_itl_ms",
                                                            "p99_itl_ms"])


def test_tpot_is_the_time_after_the_first_token_per_later_token():
    result = bench.RequestResult(10, 5, success=True, output_tokens=5, ttft=0.1, e2el=0.5)
    assert result.tpot == pytest.approx(0.1)
    assert bench.RequestResult(10, 1, success=True, output_tokens=1, ttft=0.1, e2el=0.1).tpot is None
    assert bench.RequestResult(10, 5).tpot is None   # never answered


def test_metrics_and_goodput_match_hand_computed_values():
    ok = dict(success=True)
    results = [
        bench.RequestResult(10, 3, output_tokens=3, ttft=0.1, itl=[0.05, 0.05], e2el=0.2, **ok),   # tpot 50 ms
        bench.RequestResult(20, 5, output_tokens=5, ttft=0.3, itl=[0.1] * 4, e2el=0.7, **ok),      # tpot 100 ms
        bench.RequestResult(30, 1, output_tokens=1, ttft=0.05, e2el=0.05, **ok),                    # no tpot
        bench.RequestResult(40, 4, error="HTTP 500: no"),
    ]
    m = bench.calculate_metrics(results, duration=2.0, goodput={"ttft": 200, "tpot": 60})
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 60, 9)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    # Within ttft 200 ms and tpot 60 ms: the first and the one-token request (it has no TPOT to miss).
    assert m["request_goodput"] == pytest.approx(2 / 2.0)
    assert bench.calculate_metrics(results, 2.0, {"e2el": 100})["request_goodput"] == pytest.approx(0.5)
    assert bench.calculate_metrics(results, 2.0)["request_goodput"] is None
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["median_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_tpot_ms"] == pytest.approx(75.0)
    assert m["mean_itl_ms"] == pytest.approx(np.mean([50, 50, 100, 100, 100, 100]))
    assert m["p99_e2el_ms"] == pytest.approx(np.percentile([200, 700, 50], 99))
    assert m["output_len_mismatches"] == 0


def test_a_request_that_got_other_lengths_than_asked_is_counted():
    results = [bench.RequestResult(1, 4, success=True, output_tokens=3, ttft=0.1, e2el=0.2)]
    assert bench.calculate_metrics(results, 1.0)["output_len_mismatches"] == 1


# ---------------------------------------------------------------- arrivals


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_have_the_gammas_mean_and_spread(burstiness):
    n, rate = 20_000, 10.0
    times = bench.arrival_times(n + 1, rate, burstiness, seed=3)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = np.diff(times)
    mean, cv = gaps.mean(), gaps.std() / gaps.mean()
    expected_cv = 1 / math.sqrt(burstiness)   # a gamma of shape k has CV 1/sqrt(k): 1 for Poisson
    # Six standard errors: of the mean (cv * mean / sqrt(n)), and of the CV, from the gamma's excess kurtosis 6/k.
    assert abs(mean - 1 / rate) < 6 * expected_cv / rate / math.sqrt(n)
    cv_error = math.sqrt((6 / burstiness + 2) / (4 * n)) + expected_cv / math.sqrt(n)
    assert abs(cv / expected_cv - 1) < 6 * cv_error


def test_arrivals_are_seeded_and_all_at_once_at_an_infinite_rate():
    assert bench.arrival_times(50, 5.0, 0.5, seed=1) == bench.arrival_times(50, 5.0, 0.5, seed=1)
    assert bench.arrival_times(50, 5.0, 0.5, seed=1) != bench.arrival_times(50, 5.0, 0.5, seed=2)
    assert bench.arrival_times(4, math.inf) == [0.0] * 4


# ---------------------------------------------------------------- datasets


def test_random_prompts_are_corpus_text_of_exactly_their_lengths(tokenizer, corpus):
    requests = bench.random_requests(tokenizer, corpus, 40, (5, 60), (3, 9), seed=0)
    assert requests == bench.random_requests(tokenizer, corpus, 40, (5, 60), (3, 9), seed=0)
    for r in requests:
        assert r.prompt in corpus
        assert 5 <= r.prompt_len <= 60 and len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 3 <= r.output_len <= 9
    assert len({r.prompt_len for r in requests}) > 10


def test_prefix_prompts_share_a_few_prefixes_token_for_token(tokenizer, corpus):
    requests = bench.prefix_requests(tokenizer, corpus, 12, 24, 3, (4, 10), (2, 5), seed=0)
    heads = Counter(tuple(tokenizer.encode(r.prompt, add_special_tokens=False)[:24]) for r in requests)
    assert sorted(heads.values()) == [4, 4, 4]   # three prefixes, each used equally often
    for r in requests:
        ids = tokenizer.encode(r.prompt, add_special_tokens=False)
        assert len(ids) == r.prompt_len and 24 + 4 <= r.prompt_len <= 24 + 10 and 2 <= r.output_len <= 5
        prefix = tokenizer.decode(ids[:24])
        assert r.prompt.startswith(prefix) and prefix in corpus


def test_dialogue_prompts_are_whole_speeches_asking_for_the_next_one(tokenizer, corpus):
    requests = bench.dialogue_requests(tokenizer, corpus, 15, (20, 120), (5, 40), seed=0)
    for r in requests:
        start = corpus.find(r.prompt)
        assert start == 0 or corpus[start - 2:start] == "\n\n"               # starts at a speaker's name
        assert re.search(r"\n\n[^\n]+:\n$", r.prompt)                         # ends with the next speaker's name
        assert 20 <= r.prompt_len <= 120 and len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        end = start + len(r.prompt)
        speech = corpus[end:corpus.find("\n\n", end)]
        assert speech
        assert r.output_len == min(max(len(tokenizer.encode(speech, add_special_tokens=False)), 5), 40)


def test_lengths_that_do_not_fit_the_context_are_refused(tokenizer):
    with pytest.raises(ValueError, match=r"--input-len 16:900.*--output-len 16:200.*context of 1024"):
        bench.run(input_len=(16, 900), output_len=(16, 200), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"--prefix-len 600"):
        bench.run(dataset="prefix", prefix_len=600, input_len=(16, 256), output_len=(16, 256), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"--input-len must be two integers.*\(0, 5\)"):
        bench.run(input_len=(0, 5), tokenizer=tokenizer)


# ---------------------------------------------------------------- the command line


def test_the_parser_has_vllms_options_and_defaults():
    args = parse([])
    assert args.base_url == "http://127.0.0.1:8000" and args.model == "tiny-shakespeare" and args.dataset == "random"
    assert math.isinf(args.request_rate) and args.burstiness == 1.0 and args.max_concurrency is None
    assert args.run is bench.run_cli
    args = parse(["--goodput", "ttft:500", "e2el:2000", "--request-rate", "4", "--max-concurrency", "8"])
    assert bench.parse_goodput(args.goodput) == {"ttft": 500.0, "e2el": 2000.0}
    assert (args.request_rate, args.max_concurrency) == (4.0, 8)


@pytest.mark.parametrize("argv, named", [
    (["--request-rate", "0"], "--request-rate must be a positive number or inf, got 0.0"),
    (["--request-rate", "nan"], "--request-rate .* got nan"),
    (["--burstiness", "-1"], "--burstiness must be a positive finite number, got -1.0"),
    (["--burstiness", "inf"], "--burstiness .* got inf"),
    (["--max-concurrency", "0"], "--max-concurrency .* got 0"),
    (["--num-prompts", "0"], "--num-prompts .* got 0"),
    (["--prefix-len", "-3"], "--prefix-len .* got -3"),
    (["--num-prefixes", "0"], "--num-prefixes .* got 0"),
    (["--timeout", "0"], "--timeout .* got 0.0"),
    (["--input-len", "9:2"], "--input-len needs 1 <= A <= B, got '9:2'"),
    (["--output-len", "abc"], "--output-len takes 'A:B' or 'N' with integers, got 'abc'"),
    (["--goodput", "latency:5"], "--goodput takes KEY:MS .* got 'latency:5'"),
    (["--goodput", "ttft:soon"], "--goodput ttft needs a number of milliseconds, got 'ttft:soon'"),
    (["--goodput", "tpot:-5"], "--goodput tpot must be a positive number of milliseconds, got 'tpot:-5'"),
    (["--goodput", "ttft:5", "ttft:6"], "--goodput names ttft twice, got 'ttft:6'"),
    (["--dataset", "sonnets"], "--dataset must be one of random, prefix, dialogue, got 'sonnets'"),
    (["--base-url", "localhost:8000"], "--base-url must be an http:// or https:// URL, got 'localhost:8000'"),
])
def test_bad_values_are_refused_by_name_before_anything_is_sent(argv, named):
    with pytest.raises(ValueError, match=named):
        bench.run_cli(parse(argv))


# ---------------------------------------------------------------- whole runs against the fake server


def test_a_run_measures_the_streams_timing(server, tokenizer, tmp_path):
    received.clear()
    result = bench.run(server, "timed", num_prompts=8, input_len=(8, 16), output_len=(4, 6), request_rate=100.0,
                       max_concurrency=4, goodput={"ttft": 10_000}, timeout=30, tokenizer_name="tiny-shakespeare",
                       tokenizer=tokenizer)
    requests = bench.random_requests(tokenizer, tinyshakespeare_text(), 8, (8, 16), (4, 6), seed=0)
    assert (result["completed"], result["failed"], result["errors"]) == (8, 0, {})
    assert result["total_output_tokens"] == sum(r.output_len for r in requests) and not result["output_len_mismatches"]
    assert result["total_input_tokens"] == sum(r.prompt_len for r in requests)
    assert sorted(b["prompt"] for b in received) == sorted(r.prompt for r in requests)
    for body in received:
        assert body["stream"] is True and body["ignore_eos"] is True and body["stream_options"]["include_usage"]
        assert body["model"] == "timed" and body["temperature"] == 0.0
    assert sorted(b["max_tokens"] for b in received) == sorted(r.output_len for r in requests)
    # Loose bounds: the fake server sleeps FIRST_DELAY, then GAP between chunks; a busy machine only adds.
    assert FIRST_DELAY * 1000 * 0.8 <= result["mean_ttft_ms"] < 5000
    assert GAP * 1000 * 0.5 <= result["median_itl_ms"] < 2000
    assert GAP * 1000 * 0.5 <= result["mean_tpot_ms"] < 2000
    assert result["mean_e2el_ms"] >= result["mean_ttft_ms"]
    for r in result["requests"]:
        assert r["success"] and len(r["itl"]) == r["output_tokens"] - 1 == r["output_len"] - 1
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["duration"] >= bench.arrival_times(8, 100.0, 1.0, seed=0)[-1]
    assert peak["timed"] <= 4
    record = strict_json(json.dumps(save_result("serve", result, tmp_path / "serve.json")))
    assert strict_json((tmp_path / "serve.json").read_text()) == record
    assert record["benchmark"] == "serve" and record["machine"]["cpu"] and record["request_rate"] == 100.0
    table = bench.format_table(result)
    assert "Successful requests:" in table and "P99 ITL (ms):" in table and "Request goodput" in table


def test_the_command_runs_the_prefix_workload_and_writes_json(server, tmp_path, capsys):
    path = tmp_path / "prefix.json"
    args = parse(["--base-url", server, "--model", "cli", "--dataset", "prefix", "--prefix-len", "8",
                  "--num-prefixes", "2", "--num-prompts", "4", "--input-len", "4:8", "--output-len", "2:3",
                  "--max-concurrency", "1", "--goodput", "e2el:1", "--timeout", "30", "--json", str(path),
                  "--tokenizer", "tiny-shakespeare"])
    assert bench.run_cli(args) == 0
    record = strict_json(path.read_text())
    assert record["benchmark"] == "serve" and record["dataset"] == "prefix" and record["completed"] == 4
    assert record["request_rate"] == "inf" and record["request_goodput"] == 0.0   # nothing answers within 1 ms
    assert peak["cli"] == 1
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_failures_are_counted_with_their_errors_and_never_stop_the_run(server, tokenizer):
    result = bench.run(server, "flaky", dataset="dialogue", num_prompts=10, input_len=(16, 64), output_len=(2, 3),
                       timeout=0.5, tokenizer_name="tiny-shakespeare", tokenizer=tokenizer)
    assert (result["completed"], result["failed"]) == (2, 8)
    errors = " | ".join(result["errors"])
    assert "HTTP 500" in errors and "before [DONE]" in errors and "timed out after 0.5 s" in errors
    assert len(result["errors"]) == 4 and sum(result["errors"].values()) == 8   # and the broken stream's
    assert result["total_output_tokens"] == sum(r["output_tokens"] for r in result["requests"] if r["success"])
    assert "8 failed" not in bench.format_table(result) and "2 failed: HTTP 500" in bench.format_table(result)


def test_a_server_that_is_not_there_fails_every_request(tokenizer, capsys):
    result = bench.run(f"http://127.0.0.1:{free_port()}", num_prompts=3, input_len=(4, 8), output_len=(2, 2), timeout=5,
                       tokenizer=tokenizer)
    assert (result["completed"], result["failed"]) == (0, 3)
    assert result["request_throughput"] == 0 and result["mean_ttft_ms"] is None
    assert "ConnectError" in " ".join(result["errors"]) and "-" in bench.format_table(result)
