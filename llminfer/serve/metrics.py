"""The server's Prometheus metrics, under vLLM's names so that a dashboard or alert written for vLLM reads
llminfer unchanged (https://docs.vllm.ai/en/stable/usage/metrics/).

Gauges and counters come from the engine's stats after every step (`record`, on the engine loop's thread);
the latency histograms from each request's timestamps: TTFT from arrival to the first token, one
inter-token latency per step that gave a request tokens, end-to-end from arrival to finish. Arrival is
stamped by the engine with `time.perf_counter`, a system-wide monotonic clock on Linux, so the times hold
also when the engine runs in a process of its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llminfer.engine.outputs import RequestOutput
from llminfer.serve.engine_core import EngineStats

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

    def update_gauges(self, stats: EngineStats) -> None:
        """The engine's state as of its last step or abort."""
        m = self.labels
        self.running.labels(**m).set(stats.num_running)
        self.waiting.labels(**m).set(stats.num_waiting)
        self.kv_usage.labels(**m).set(stats.num_used_blocks / stats.num_blocks)

    def record(self, stats: EngineStats, outputs: list[RequestOutput] | None = None) -> None:
        """Update everything from one step's stats (an abort sends stats alone). The outputs are not needed: the
        stats carry every request's progress, also of those whose caller asked for the final output only."""
        m = self.labels
        self.update_gauges(stats)
        self.prefix_queries.labels(**m).inc(stats.prefix_queries)
        self.prefix_hits.labels(**m).inc(stats.prefix_hits)
        self.preemptions.labels(**m).inc(stats.preemptions)
        for request_id, prompt_tokens, produced, arrival, finish_reason in stats.progress:
            before = self._tokens_seen.get(request_id, 0)
            if produced > before:
                if before == 0:
                    self.prompt_tokens.labels(**m).inc(prompt_tokens)
                    self.ttft.labels(**m).observe(stats.time - arrival)
                else:
                    self.itl.labels(**m).observe(stats.time - self._last_token_time[request_id])
                self.generation_tokens.labels(**m).inc(produced - before)
                self._tokens_seen[request_id], self._last_token_time[request_id] = produced, stats.time
            if finish_reason is not None:
                self._forget(request_id)
                self.success.labels(**m, finished_reason=finish_reason).inc()
                self.e2e.labels(**m).observe(stats.time - arrival)
        for request_id in stats.aborted_ids:   # an aborted request reports no last output
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._tokens_seen.pop(request_id, None)
        self._last_token_time.pop(request_id, None)
