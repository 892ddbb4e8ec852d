"""llminfer.bench.tuning, the measurements of the tuning chapter: latencies from request metrics against hand
computation, the sweep's settings, and a profiled step whose stage shares add up."""

import numpy as np
import pytest

from llminfer import LLM
from llminfer.bench import tuning
from llminfer.bench.throughput import Request
from llminfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput


def output(arrival, first, finished, tokens):
    return RequestOutput("r", None, [1, 2], None, [CompletionOutput(0, "", list(range(tokens)), None, None, "length")],
                         True, [], 0, RequestMetrics(arrival, arrival, first, finished))


def test_latency_summary_matches_hand_computation():
    outs = [output(0.0, 0.1, 1.1, 11), output(1.0, 1.5, 1.5, 1), output(2.0, 2.2, 4.2, 5)]
    summary = tuning.latency_summary(outs)
    ttft = np.array([0.1, 0.5, 0.2]) * 1e3
    tpot = np.array([1.0 / 10, 2.0 / 4]) * 1e3          # the one-token request has no TPOT
    e2el = np.array([1.1, 0.5, 2.2]) * 1e3
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2el", e2el)):
        assert summary[f"mean_{name}_ms"] == pytest.approx(values.mean())
        assert summary[f"median_{name}_ms"] == pytest.approx(np.median(values))
        assert summary[f"p90_{name}_ms"] == pytest.approx(np.percentile(values, 90))


def test_sweep_settings_vary_one_argument_and_list_the_defaults_once():
    settings = tuning.sweep_settings({"max_num_seqs": (4, 256), "block_size": (16, 32)})
    assert settings == [tuning.DEFAULTS | {"max_num_seqs": 4}, tuning.DEFAULTS, tuning.DEFAULTS | {"block_size": 32}]


def test_requests_for_one_step_fit_the_budget():
    requests = [Request(list(range(n)), 4) for n in (30, 50, 40, 10)]
    chosen = tuning.requests_for_one_step(requests, 100)
    assert [len(r.prompt_token_ids) for r in chosen] == [30, 50]


def test_a_profiled_step_splits_into_shares_that_add_up():
    llm = LLM("tiny-shakespeare", device="cpu", cpu_threads=1, kv_cache_memory_bytes=2**24)
    requests = tuning.corpus_requests(llm.tokenizer, 4, (16, 32), (8, 8), seed=0)
    profile = tuning.profile_steps(llm, requests, decode_steps=2)
    for phase in profile.values():
        assert sum(phase["share"].values()) == pytest.approx(1.0, abs=1e-6)
        assert phase["share"]["matmuls"] > 0
