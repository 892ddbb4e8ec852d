"""The server's Prometheus metrics, under vLLM's names so that a dashboard or alert written for vLLM reads
llminfer unchanged (https://docs.vllm.ai/en/stable/usage/metrics/).

Gauges and counters come from the engine after every step (`record_step`, run in the engine thread);
the latency histograms from each request's timestamps: TTFT from arrival to the first token, one
inter-token latency per step that gave a request tokens, end-to-end from arrival to finish.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput

# Bucket edges in seconds, spanning a CPU's tiny model (ms) to a loaded GPU server (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """One registry per server, so several servers (or tests) in one process do not collide."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels, self.labels = ["model_name"], {"model_name": model_name}

        def make(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, labels + kwargs.pop("extra_labels", []), registry=self.registry, **kwargs)

        self.running = make(Gauge, "vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = make(Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = make(Gauge, "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.prefix_queries = make(Counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = make(Counter, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = make(Counter, "vllm:num_preemptions", "Requests preempted for KV cache space.")
        self.prompt_tokens = make(Counter, "vllm:prompt_tokens", "Prompt tokens of requests that started decoding.")
        self.generation_tokens = make(Counter, "vllm:generation_tokens", "Tokens generated.")
        self.success = make(Counter, "vllm:request_success", "Requests finished, by finish reason.",
                            extra_labels=["finished_reason"])
        self.ttft = make(Histogram, "vllm:time_to_first_token_seconds", "Arrival to first token.",
                         buckets=LATENCY_BUCKETS)
        self.itl = make(Histogram, "vllm:inter_token_latency_seconds", "Time between a request's token steps.",
                        buckets=LATENCY_BUCKETS)
        self.e2e = make(Histogram, "vllm:e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS)
        self._last_token_time: dict[str, float] = {}   # request id -> when it last gained tokens
        self._tokens_seen: dict[str, int] = {}          # request id -> output tokens counted so far

    def update_gauges(self, engine: LLMEngine) -> None:
        """The engine's state now. Called after every step and again when /metrics is scraped: an abort
        while the engine is idle changes the state without a step."""
        m = self.labels
        self.running.labels(**m).set(len(engine.scheduler.running))
        self.waiting.labels(**m).set(len(engine.scheduler.waiting))
        self.kv_usage.labels(**m).set(engine.pool.num_used_blocks / engine.pool.num_blocks)

    def record_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        """Update everything from the engine's state and the outputs of the step it just ran."""
        now = time.perf_counter()
        m = self.labels
        self.update_gauges(engine)
        if engine.trace:
            record = engine.trace[-1]
            prompt_lengths = {o.request_id: len(o.prompt_token_ids) for o in outputs}
            for request_id, hits in record.prefix_hits.items():
                seq = engine.requests.get(request_id)
                looked_up = seq.num_prompt_tokens if seq is not None else prompt_lengths.get(request_id, hits)
                self.prefix_queries.labels(**m).inc(looked_up)
                self.prefix_hits.labels(**m).inc(hits)
            self.preemptions.labels(**m).inc(len(record.preempted))
        for output in outputs:
            self._record_request(output, now)

    def _record_request(self, output: RequestOutput, now: float) -> None:
        m, request_id = self.labels, output.request_id
        produced = sum(len(c.token_ids) for c in output.outputs)
        before = self._tokens_seen.get(request_id, 0)
        if produced > before:
            if before == 0:
                self.prompt_tokens.labels(**m).inc(len(output.prompt_token_ids))
                self.ttft.labels(**m).observe(now - output.metrics.arrival_time)
            else:
                self.itl.labels(**m).observe(now - self._last_token_time[request_id])
            self.generation_tokens.labels(**m).inc(produced - before)
            self._tokens_seen[request_id], self._last_token_time[request_id] = produced, now
        if output.finished:
            self._tokens_seen.pop(request_id, None)
            self._last_token_time.pop(request_id, None)
            reason = next((c.finish_reason for c in output.outputs if c.finish_reason), "abort")
            self.success.labels(**m, finished_reason=reason).inc()
            self.e2e.labels(**m).observe(now - output.metrics.arrival_time)
