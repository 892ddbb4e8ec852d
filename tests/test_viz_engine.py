"""The engine figures draw what the real trace says: one bar per (step, request), work split by kind."""

import random
from collections import Counter

import pytest
import torch
from matplotlib.figure import Figure

from llminfer import SamplingParams, load_model
from llminfer.engine import LLMEngine
from llminfer.viz.engine import plot_gantt, plot_kv_usage, plot_tokens_per_step, segments, tokens_per_step

OUTPUT_TOKENS = {"r0": 40, "r1": 24, "r2": 24, "r3": 24, "r4": 24, "r5": 24}


def run_engine(**kwargs) -> tuple[LLMEngine, dict[str, int]]:
    """Six random prompts: a short one first, whose long output keeps a decode in every step while the
    others (9 to 40 tokens) are prefilled. Returns the engine and the prompt lengths."""
    model, tokenizer = load_model("tiny-shakespeare", device="cpu", dtype=torch.float32)
    engine = LLMEngine(model, tokenizer, block_size=4, max_model_len=64, enable_prefix_caching=False, **kwargs)
    rng = random.Random(0)
    prompt_lens = {}
    for request_id, output_len in OUTPUT_TOKENS.items():
        prompt_len = 4 if request_id == "r0" else rng.randint(9, 40)
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(prompt_len)]
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        prompt_lens[engine.add_request(request_id, {"prompt_token_ids": prompt}, params)] = len(prompt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small gain nothing from a second thread, which only waits on a busy CPU
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        torch.set_num_threads(threads)
    return engine, prompt_lens


@pytest.fixture(scope="module")
def ample():
    """Enough memory for everyone, and a budget small enough to chunk the longer prompts."""
    return run_engine(num_kv_blocks=200, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tight():
    """A pool of 20 blocks of 4 tokens: six requests of up to 64 tokens must take turns."""
    return run_engine(num_kv_blocks=20, max_num_batched_tokens=64)


def pairs(trace) -> list[tuple[int, str]]:
    return [(record.step, request_id) for record in trace for request_id in record.scheduled]


def bars_drawn(ax) -> int:
    return sum(len(collection.get_paths()) for collection in ax.collections)


@pytest.mark.parametrize("name", ["ample", "tight"])
def test_one_bar_per_step_and_request(name, request):
    engine, prompt_lens = request.getfixturevalue(name)
    ax = Figure().add_subplot()
    drawn = plot_gantt(ax, engine.trace, prompt_lens)
    assert [(s.step, s.request_id) for s in drawn] == pairs(engine.trace)
    assert bars_drawn(ax) == len(pairs(engine.trace))
    markers = [line for line in ax.lines if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(markers) == sum(len(record.preempted) for record in engine.trace)


def test_without_preemption_each_prompt_is_prefilled_once_and_each_fed_back_token_is_a_decode(ample):
    engine, prompt_lens = ample
    assert not any(record.preempted for record in engine.trace)
    tokens = Counter()
    for segment in segments(engine.trace, prompt_lens):
        for kind in ("prefill", "decode", "recompute"):
            tokens[segment.request_id, kind] += getattr(segment, kind)
    for request_id, prompt_len in prompt_lens.items():
        assert tokens[request_id, "prefill"] == prompt_len
        # The first token comes out of the prefill; the last one is sampled but never fed back.
        assert tokens[request_id, "decode"] == OUTPUT_TOKENS[request_id] - 1
        assert tokens[request_id, "recompute"] == 0
    assert max(sum(record.scheduled.values()) for record in engine.trace) <= 16
    assert any(n > 1 and n < prompt_lens[r] for record in engine.trace for r, n in record.scheduled.items()), \
        "the budget should have chunked at least one prompt"


def test_preempted_requests_recompute_what_they_had(tight):
    engine, prompt_lens = tight
    preempted = Counter(r for record in engine.trace for r in record.preempted)
    assert preempted, "a pool of 20 blocks should force preemptions"
    drawn = segments(engine.trace, prompt_lens)
    recomputed = Counter()
    for segment in drawn:
        recomputed[segment.request_id] += segment.recompute
    assert set(r for r, n in recomputed.items() if n) == set(preempted)
    # First-time work is unchanged by preemption: every prompt once, every fed-back token once.
    assert sum(s.prefill for s in drawn) == sum(prompt_lens.values())
    assert sum(s.decode for s in drawn) == sum(n - 1 for n in OUTPUT_TOKENS.values())
    assert sum(s.num_tokens for s in drawn) == sum(sum(record.scheduled.values()) for record in engine.trace)


@pytest.mark.parametrize("name", ["ample", "tight"])
def test_tokens_per_step_add_up_to_the_trace(name, request):
    engine, prompt_lens = request.getfixturevalue(name)
    ax = Figure().add_subplot()
    counts = plot_tokens_per_step(ax, engine.trace, prompt_lens, budget=engine.scheduler.max_num_batched_tokens)
    assert counts == tokens_per_step(engine.trace, prompt_lens)
    totals = [sum(column) for column in zip(*counts.values())]
    assert totals == [sum(record.scheduled.values()) for record in engine.trace]
    assert len(ax.patches) == len(engine.trace) * sum(1 for c in counts.values() if any(c))


def test_kv_usage_follows_the_trace_and_marks_preempting_steps(tight):
    engine, _ = tight
    ax = Figure().add_subplot()
    marked = plot_kv_usage(ax, engine.trace, engine.pool.num_blocks)
    assert marked == [record.step for record in engine.trace if record.preempted]
    usage = ax.lines[0]
    assert list(usage.get_ydata()) == [record.num_used_blocks for record in engine.trace]
    assert max(usage.get_ydata()) <= engine.pool.num_blocks
    assert engine.pool.num_used_blocks == 0  # every block came back
