"""`llminfer bench serve`: a load generator for an OpenAI-compatible server, shaped like `vllm bench serve`.

Requests arrive as a gamma process at `--request-rate` (Poisson at `--burstiness` 1, burstier below), optionally
with at most `--max-concurrency` in flight. Each streams `POST /v1/completions` with EOS ignored, so it generates
exactly its output length. Per request it records the time to the first text (TTFT), the gaps between text chunks
(ITL), the time per output token after the first (TPOT) and the end-to-end latency (E2EL); the aggregate follows
vLLM's benchmark: throughputs, mean/median/p90/p99 of each latency in ms, and goodput under SLOs.

Prompts are cut from the tiny Shakespeare corpus: random windows (`random`), a few shared prefixes each followed by
a random suffix (`prefix`, the workload a prefix cache pays on), or runs of consecutive speeches ending with the next
speaker's name, whose speech sets the output length (`dialogue`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx

DATASETS = ("random", "prefix", "dialogue")
SLO_KEYS = ("ttft", "tpot", "e2el")
METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "tiny-shakespeare"
MAX_TRIES = 100          # draws of one prompt of a wanted length before giving up
ERROR_CHARS = 300        # of an error message or an error response's body kept in the result
TOP_ERRORS = 5           # distinct error messages kept in the result and shown in the table


class Tokenizer(Protocol):
    """The two methods of a Hugging Face tokenizer that the datasets use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: its prompt, the prompt's tokens, and how many tokens to generate (exactly)."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    """What one request measured, times in seconds; `error` says why it failed (None when it succeeded)."""

    prompt_len: int
    output_len: int                     # asked for, as max_tokens
    success: bool = False
    error: str | None = None
    output_tokens: int | None = None    # the server's count, from the stream's usage chunk
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2el - ttft) / (output_tokens - 1); None below 2 tokens."""
        if self.ttft is None or self.e2el is None or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------- settings


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """'16:256' -> (16, 256) and '128' -> (128, 128), with 1 <= A <= B; `flag` names the option in errors."""
    low, sep, high = str(text).partition(":")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"{flag} takes 'A:B' or 'N' with integers, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{flag} needs 1 <= A <= B, got {text!r}")
    return bounds


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'e2el:2000'] -> {'ttft': 500.0, 'e2el': 2000.0}: SLOs in ms on any of TTFT, TPOT and E2EL."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = str(item).partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY one of {', '.join(SLO_KEYS)}, got {item!r}")
        if key in slos:
            raise ValueError(f"--goodput names {key} twice, got {item!r}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key} needs a number of milliseconds, got {item!r}") from None
        if not (math.isfinite(slos[key]) and slos[key] > 0):
            raise ValueError(f"--goodput {key} must be a positive number of milliseconds, got {item!r}")
    return slos


def _check_count(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be an integer of at least 1, got {value!r}")


def _check_positive(flag: str, value: Any, allow_inf: bool = False) -> None:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (number > 0 and (allow_inf or math.isfinite(number))):
        kind = "a positive number or inf" if allow_inf else "a positive finite number"
        raise ValueError(f"{flag} must be {kind}, got {value!r}")


def _check_bounds(flag: str, bounds: Any) -> None:
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) and 1 <= bounds[0] <= bounds[1]):
        raise ValueError(f"{flag} must be two integers 1 <= A <= B, got {bounds!r}")


def check_settings(base_url: str, dataset: str, num_prompts: int, prefix_len: int, num_prefixes: int,
                   request_rate: float, burstiness: float, max_concurrency: int | None, timeout: float,
                   goodput: dict[str, float]) -> None:
    """Refuse, before anything loads or is sent, a value the run cannot use; the error names the option and value."""
    if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
        raise ValueError(f"--base-url must be an http:// or https:// URL, got {base_url!r}")
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    _check_count("--num-prompts", num_prompts)
    _check_count("--prefix-len", prefix_len)
    _check_count("--num-prefixes", num_prefixes)
    if max_concurrency is not None:
        _check_count("--max-concurrency", max_concurrency)
    _check_positive("--request-rate", request_rate, allow_inf=True)
    _check_positive("--burstiness", burstiness)
    _check_positive("--timeout", timeout)
    parse_goodput([f"{key}:{ms}" for key, ms in goodput.items()])


def check_context(dataset: str, input_len: tuple[int, int], output_len: tuple[int, int], prefix_len: int,
                  context: int, special_tokens: int = 0) -> None:
    """Refuse lengths whose longest prompt plus longest output would not fit the model's context."""
    prompt = input_len[1] + special_tokens + (prefix_len if dataset == "prefix" else 0)
    if prompt + output_len[1] > context:
        parts = f"--input-len {input_len[0]}:{input_len[1]}" + (f" + --prefix-len {prefix_len}"
                                                               if dataset == "prefix" else "")
        raise ValueError(f"prompts of up to {prompt} tokens ({parts}) plus outputs of up to {output_len[1]} tokens "
                         f"(--output-len {output_len[0]}:{output_len[1]}) exceed the model's context of {context} "
                         f"tokens: lower the longest lengths")


# ---------------------------------------------------------------- arrivals


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is sent: the first at 0, then gaps drawn from a gamma of shape
    `burstiness` and mean 1/`request_rate` (exponential, i.e. Poisson arrivals, at 1); all 0 at an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(f"arrivals:{seed}")
    scale = 1.0 / (request_rate * burstiness)   # mean gap = shape * scale = 1 / rate
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times


# ---------------------------------------------------------------- datasets


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def line_starts(corpus: str) -> list[int]:
    """Offsets of the corpus's non-blank lines: windows start there, so their first token starts a word."""
    return [m.start() for m in re.finditer(r"^(?=\S)", corpus, re.MULTILINE)]


def corpus_window(tokenizer: Tokenizer, corpus: str, starts: list[int], rng: random.Random, num_tokens: int) -> str:
    """Corpus text from a random line start that encodes to exactly `num_tokens` tokens."""
    for _ in range(MAX_TRIES):
        start = rng.choice(starts)
        ids = _encode(tokenizer, corpus[start:start + 8 * num_tokens + 64])   # ~3 characters a token: plenty
        take = num_tokens
        for _ in range(4):   # a word cut in two may re-encode to another count: move the cut by the difference
            if not 1 <= take <= len(ids):
                break
            text = _decode(tokenizer, ids[:take])
            count = len(_encode(tokenizer, text))
            if count == num_tokens:
                return text
            take += num_tokens - count
    raise RuntimeError(f"found no corpus text of exactly {num_tokens} tokens in {MAX_TRIES} tries")


def random_requests(tokenizer: Tokenizer, corpus: str, num_prompts: int, input_len: tuple[int, int],
                    output_len: tuple[int, int], seed: int = 0) -> list[BenchRequest]:
    """Corpus windows of lengths uniform in `input_len` tokens, asking for lengths uniform in `output_len`."""
    rng = random.Random(seed)
    starts = line_starts(corpus)
    requests = []
    for _ in range(num_prompts):
        length = rng.randint(*input_len)
        requests.append(BenchRequest(corpus_window(tokenizer, corpus, starts, rng, length), length,
                                     rng.randint(*output_len)))
    return requests


def prefix_requests(tokenizer: Tokenizer, corpus: str, num_prompts: int, prefix_len: int, num_prefixes: int,
                    suffix_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0) -> list[BenchRequest]:
    """Each prompt is one of `num_prefixes` shared prefixes of `prefix_len` tokens, then a newline and corpus text
    (`suffix_len` tokens with the newline), checked to encode to the prefix's own tokens first; each prefix is
    used equally often, in shuffled order."""
    rng = random.Random(seed)
    starts = line_starts(corpus)
    prefixes: list[str] = []
    for _ in range(MAX_TRIES * num_prefixes):
        if len(prefixes) == num_prefixes:
            break
        text = corpus_window(tokenizer, corpus, starts, rng, prefix_len)
        if not text[-1].isspace() and text not in prefixes:   # a trailing space could merge with the newline after
            prefixes.append(text)
    if len(prefixes) < num_prefixes:
        raise ValueError(f"found only {len(prefixes)} distinct prefixes of --prefix-len {prefix_len} tokens, "
                         f"not --num-prefixes {num_prefixes}")
    prefix_ids = {p: _encode(tokenizer, p) for p in prefixes}
    order = [prefixes[i % num_prefixes] for i in range(num_prompts)]
    rng.shuffle(order)
    requests = []
    for prefix in order:
        length = rng.randint(*suffix_len)
        for _ in range(MAX_TRIES):
            suffix = "\n" + (corpus_window(tokenizer, corpus, starts, rng, length - 1) if length > 1 else "")
            ids = _encode(tokenizer, prefix + suffix)
            if ids[:prefix_len] == prefix_ids[prefix] and len(ids) == prefix_len + length:
                break
        else:
            raise RuntimeError(f"found no suffix of {length} tokens that keeps a prefix's tokens in {MAX_TRIES} tries")
        requests.append(BenchRequest(prefix + suffix, prefix_len + length, rng.randint(*output_len)))
    return requests


@dataclass(frozen=True)
class Turn:
    """One speech of the play by character offsets: its speaker's name line starts at `start`, what is said
    runs from `speech` to `end` (empty for a name with no lines)."""

    start: int
    speech: int
    end: int


def dialogue_turns(corpus: str) -> list[Turn]:
    """The play's speeches in order: blocks of lines between blank lines whose first line is 'NAME:'."""
    turns = []
    for block in re.finditer(r"[^\n]+(?:\n[^\n]+)*", corpus):
        name, newline, _ = block.group().partition("\n")
        if name.endswith(":"):
            turns.append(Turn(block.start(), min(block.start() + len(name) + len(newline), block.end()), block.end()))
    return turns


def dialogue_requests(tokenizer: Tokenizer, corpus: str, num_prompts: int, input_len: tuple[int, int],
                      output_len: tuple[int, int], seed: int = 0) -> list[BenchRequest]:
    """Prompts of consecutive whole speeches ending with the next speaker's 'NAME:' line, of lengths in `input_len`;
    each asks for as many tokens as that next speech has, clipped into `output_len`."""
    rng = random.Random(seed)
    turns = dialogue_turns(corpus)
    if len(turns) < 2:
        raise ValueError("the corpus has fewer than two speeches: no dialogue to cut")
    requests: list[BenchRequest] = []
    tries = 0
    while len(requests) < num_prompts:
        tries += 1
        if tries > MAX_TRIES * (num_prompts + 1):
            raise ValueError(f"found only {len(requests)} of {num_prompts} dialogue prompts with --input-len "
                             f"{input_len[0]}:{input_len[1]} in {tries - 1} tries: widen the range")
        target = rng.randint(*input_len)
        first = rng.randrange(len(turns) - 1)
        best = None
        for nxt in range(first + 1, len(turns)):   # grow the run of speeches until the prompt reaches the target
            if turns[nxt].speech == turns[nxt].end:
                continue                           # a name with no lines cannot be the speech asked for
            prompt = corpus[turns[first].start:turns[nxt].speech]
            length = len(_encode(tokenizer, prompt))
            if length > input_len[1]:
                break
            best = (prompt, length, nxt)
            if length >= target:
                break
        if best is None or best[1] < input_len[0]:
            continue
        prompt, length, nxt = best
        speech = len(_encode(tokenizer, corpus[turns[nxt].speech:turns[nxt].end]))
        requests.append(BenchRequest(prompt, length, min(max(speech, output_len[0]), output_len[1])))
    return requests


# ---------------------------------------------------------------- sending


class StreamError(Exception):
    """The server answered, but not with a complete stream of completions."""


async def _error_body(response: httpx.Response) -> str:
    """At most ERROR_CHARS of an error response's body, read without waiting for the rest."""
    body = b""
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= ERROR_CHARS:
            break
    return body[:ERROR_CHARS].decode(errors="replace").strip()


async def _stream(client: httpx.AsyncClient, url: str, payload: dict, start: float, result: RequestResult) -> None:
    """Read one streamed completion into `result`, raising if the stream is not a complete one."""
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            raise StreamError(f"HTTP {response.status_code}: {await _error_body(response)}")
        last, done = None, False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue                            # blank separators, comments, event names
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise StreamError(f"a chunk is not a JSON object: {data[:ERROR_CHARS]}")
            if chunk.get("error"):
                raise StreamError(f"error in the stream: {json.dumps(chunk['error'])[:ERROR_CHARS]}")
            if isinstance(chunk.get("usage"), dict):
                result.output_tokens = chunk["usage"].get("completion_tokens")
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2el = time.perf_counter() - start
    if not done:
        raise StreamError("the stream ended before [DONE]")
    if last is None:
        raise StreamError("the stream carried no text")
    if not isinstance(result.output_tokens, int) or isinstance(result.output_tokens, bool):
        raise StreamError("the stream carried no usage.completion_tokens (the server must honor "
                          "stream_options.include_usage)")


async def send_request(client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest,
                       timeout: float) -> RequestResult:
    """Stream one completion and time its chunks; a failure of any kind is recorded in the result, never raised."""
    result = RequestResult(request.prompt_len, request.output_len)
    payload = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
               "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, base_url.rstrip("/") + "/v1/completions", payload, start, result),
                               timeout)
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout:g} s"
    except StreamError as exc:
        result.error = str(exc)[:ERROR_CHARS]
    except Exception as exc:   # a refused connection, a broken stream, a malformed chunk: the run goes on
        result.error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
    result.success = result.error is None
    return result


async def benchmark(base_url: str, model: str, requests: list[BenchRequest], arrivals: list[float],
                    max_concurrency: int | None, timeout: float) -> tuple[list[RequestResult], float]:
    """Send each request at its arrival time, waiting for a free slot under `max_concurrency`; return the results
    in request order and the seconds from the first send to the last answer."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # No proxy from the environment: the benchmark measures the server, not a hop on the way.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, trust_env=False) as client:
        start = time.perf_counter()

        async def one(request: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            if slots is None:
                return await send_request(client, base_url, model, request, timeout)
            async with slots:
                return await send_request(client, base_url, model, request, timeout)

        results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, arrivals, strict=True)))
        return list(results), time.perf_counter() - start


# ---------------------------------------------------------------- metrics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between the closest ranks as numpy does by default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_stats(name: str, seconds: list[float]) -> dict[str, float | None]:
    """Mean, median, p90 and p99 of `seconds` in ms under vLLM's keys (mean_ttft_ms, ...); None when empty."""
    ms = [s * 1000 for s in seconds]
    values = ((statistics.fmean(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99)) if ms
              else (None,) * 4)
    return {f"{stat}_{name}_ms": v for stat, v in zip(("mean", "median", "p90", "p99"), values, strict=True)}


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a completed request is within every SLO (ms); one output token has no TPOT, so it meets a TPOT SLO."""
    seconds = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    return all(seconds[key] is not None and seconds[key] * 1000 <= slo for key, slo in slos.items())


def calculate_metrics(results: list[RequestResult], duration: float,
                      goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """vLLM's aggregate over the completed requests: counts, throughputs per second of `duration`, goodput
    (completed requests within every SLO per second; None without SLOs), and each latency's statistics in ms."""
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens or 0 for r in done)

    def per_second(amount: float) -> float | None:
        return amount / duration if duration > 0 else None

    metrics: dict[str, Any] = {
        "completed": len(done), "failed": len(results) - len(done), "duration": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": per_second(len(done)),
        "request_goodput": per_second(sum(meets_slos(r, goodput) for r in done)) if goodput else None,
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        # with EOS ignored every request should produce exactly what it asked for
        "output_len_mismatches": sum(r.output_tokens != r.output_len for r in done),
    }
    samples = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.tpot is not None],
               "itl": [gap for r in done for gap in r.itl], "e2el": [r.e2el for r in done]}
    for name in METRICS:
        metrics |= latency_stats(name, samples[name])
    return metrics


# ---------------------------------------------------------------- the run


def _run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, also from inside a running event loop (a notebook), by running it on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def model_context(model: str) -> int:
    """The model's context in tokens, `max_position_embeddings` of its config."""
    from llminfer.models.config import ModelConfig
    from llminfer.models.registry import resolve_model_path

    return ModelConfig.from_pretrained(resolve_model_path(model)).max_position_embeddings


def build_requests(tokenizer: Tokenizer, corpus: str, dataset: str, num_prompts: int, input_len: tuple[int, int],
                   output_len: tuple[int, int], prefix_len: int, num_prefixes: int, seed: int) -> list[BenchRequest]:
    """The `dataset`'s requests (see random_requests, prefix_requests and dialogue_requests)."""
    if dataset == "random":
        return random_requests(tokenizer, corpus, num_prompts, input_len, output_len, seed)
    if dataset == "prefix":
        return prefix_requests(tokenizer, corpus, num_prompts, prefix_len, num_prefixes, input_len, output_len, seed)
    if dataset == "dialogue":
        return dialogue_requests(tokenizer, corpus, num_prompts, input_len, output_len, seed)
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def run(base_url: str = DEFAULT_BASE_URL, model: str = DEFAULT_MODEL, dataset: str = "random",
        num_prompts: int = 100, input_len: tuple[int, int] = (16, 256), output_len: tuple[int, int] = (16, 256),
        prefix_len: int = 128, num_prefixes: int = 4, request_rate: float = math.inf, burstiness: float = 1.0,
        max_concurrency: int | None = None, seed: int = 0, goodput: dict[str, float] | None = None,
        timeout: float = 600.0, tokenizer_name: str | None = None, tokenizer: Tokenizer | None = None) -> dict:
    """Build the dataset, send it to the server at the arrival times, and return the settings, the metrics, the
    most common errors and every request's measurements. The tokenizer and context are those of `tokenizer_name`
    (default `model`); a `tokenizer` object, if given, is used instead of loading one."""
    goodput = dict(goodput or {})
    check_settings(base_url, dataset, num_prompts, prefix_len, num_prefixes, request_rate, burstiness,
                   max_concurrency, timeout, goodput)
    for flag, bounds in (("--input-len", input_len), ("--output-len", output_len)):
        _check_bounds(flag, bounds)
    from llminfer.datasets import tinyshakespeare_text

    source = tokenizer_name or model
    if tokenizer is None:
        from llminfer.models.loader import load_tokenizer
        from llminfer.models.registry import resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(source))
    special = len(tokenizer.encode("", add_special_tokens=True))   # a BOS the server adds also takes a position
    check_context(dataset, input_len, output_len, prefix_len, model_context(source), special)
    requests = build_requests(tokenizer, tinyshakespeare_text(), dataset, num_prompts, input_len, output_len,
                              prefix_len, num_prefixes, seed)
    arrivals = arrival_times(num_prompts, request_rate, burstiness, seed)
    results, duration = _run_async(benchmark(base_url, model, requests, arrivals, max_concurrency, timeout))
    errors = Counter(r.error for r in results if r.error is not None)
    return {
        "base_url": base_url, "model": model, "tokenizer": source, "dataset": dataset, "num_prompts": num_prompts,
        "input_len": list(input_len), "output_len": list(output_len),
        "prefix_len": prefix_len if dataset == "prefix" else None,
        "num_prefixes": num_prefixes if dataset == "prefix" else None,
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,   # JSON has no infinity
        "burstiness": burstiness, "max_concurrency": max_concurrency, "seed": seed, "timeout": timeout,
        "goodput_slos_ms": goodput,
        **calculate_metrics(results, duration, goodput),
        "errors": dict(errors.most_common(TOP_ERRORS)),
        "requests": [asdict(r) | {"tpot": r.tpot} for r in results],
    }


def format_table(result: dict) -> str:
    """The result as vLLM prints it: counts and throughputs, then each latency's mean, median, p90 and p99."""
    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    width = 50
    lines = [" Serving Benchmark Result ".center(width, "="),
             f"{'Successful requests:':<40}{result['completed']:>10}",
             f"{'Failed requests:':<40}{result['failed']:>10}",
             f"{'Maximum request concurrency:':<40}{str(result['max_concurrency']):>10}",
             f"{'Request rate configured (RPS):':<40}{str(result['request_rate']):>10}",
             f"{'Burstiness:':<40}{result['burstiness']:>10}",
             f"{'Benchmark duration (s):':<40}{number(result['duration']):>10}",
             f"{'Total input tokens:':<40}{result['total_input_tokens']:>10}",
             f"{'Total generated tokens:':<40}{result['total_output_tokens']:>10}",
             f"{'Request throughput (req/s):':<40}{number(result['request_throughput']):>10}"]
    if result["goodput_slos_ms"]:
        lines.append(f"{'Request goodput (req/s):':<40}{number(result['request_goodput']):>10}")
    lines += [f"{'Output token throughput (tok/s):':<40}{number(result['output_throughput']):>10}",
              f"{'Total token throughput (tok/s):':<40}{number(result['total_token_throughput']):>10}"]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in METRICS:
        lines.append(f" {titles[name]} ".center(width, "-"))
        for stat in ("mean", "median", "p90", "p99"):
            label = f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {name.upper()} (ms):"
            lines.append(f"{label:<40}{number(result[f'{stat}_{name}_ms']):>10}")
    lines.append("=" * width)
    if result["output_len_mismatches"]:
        lines.append(f"{result['output_len_mismatches']} completed requests got another number of tokens than "
                     f"they asked for")
    for error, count in result["errors"].items():
        lines.append(f"{count} failed: {error}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def run_cli(args: argparse.Namespace) -> int:
    """`llminfer bench serve`: run, print the table, write --json; 1 if no request completed. Bad values raise."""
    from llminfer.bench.record import save_result

    result = run(args.base_url, args.model, args.dataset, args.num_prompts,
                 parse_range(args.input_len, "--input-len"), parse_range(args.output_len, "--output-len"),
                 args.prefix_len, args.num_prefixes, args.request_rate, args.burstiness, args.max_concurrency,
                 args.seed, parse_goodput(args.goodput), args.timeout, args.tokenizer)
    if args.json:
        save_result("serve", result, args.json)
    print(format_table(result))
    if not result["completed"]:
        print(f"llminfer: no request to {args.base_url} completed", file=sys.stderr)
    return 0 if result["completed"] else 1


def add_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to the `llminfer bench` subcommands, its run function set as `run`."""
    sp = bench_subparsers.add_parser("serve", help="load an OpenAI-compatible server with streamed completions "
                                                   "and report TTFT, TPOT, ITL, latency and throughput")
    sp.add_argument("--base-url", default=DEFAULT_BASE_URL, help="the server; requests go to BASE/v1/completions")
    sp.add_argument("--model", default=DEFAULT_MODEL, help="the served model's name")
    sp.add_argument("--tokenizer", default=None, help="model whose tokenizer and context size the prompts "
                                                      "are cut for (default: --model)")
    sp.add_argument("--dataset", default="random", help=f"one of {', '.join(DATASETS)}")
    sp.add_argument("--num-prompts", type=int, default=100)
    sp.add_argument("--input-len", default="16:256",
                    help="prompt tokens, uniform in A:B (prefix: the suffix after the shared prefix)")
    sp.add_argument("--output-len", default="16:256",
                    help="output tokens, uniform in C:D (dialogue: the next speech's, clipped into C:D)")
    sp.add_argument("--prefix-len", type=int, default=128, help="prefix dataset: tokens of each shared prefix")
    sp.add_argument("--num-prefixes", type=int, default=4, help="prefix dataset: distinct shared prefixes")
    sp.add_argument("--request-rate", type=float, default=math.inf, help="requests per second; inf: all at once")
    sp.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of the gaps between arrivals: 1 is Poisson, below 1 burstier")
    sp.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                    help="SLOs in ms, any of ttft:MS tpot:MS e2el:MS; goodput counts requests meeting them all")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds before one request is given up")
    sp.add_argument("--json", default=None, help="write the result, with the machine, to this file")
    sp.set_defaults(run=run_cli)
    return sp
