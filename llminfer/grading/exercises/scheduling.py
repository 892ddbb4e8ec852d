"""Chapter 8, scheduling: one step of the token-budget rule, `{request: tokens to compute}`.

The requests are the engine's own `Sequence`s; the rule reads three things of each: `request_id`,
`num_tokens` and `num_computed_tokens`. Memory is plentiful here (no preemption, no prefix cache).
"""

from __future__ import annotations

import random
from numbers import Integral

from llminfer.engine.scheduler import Scheduler
from llminfer.engine.sequence import RequestStatus, Sequence
from llminfer.grading.compare import Mismatch
from llminfer.grading import wire
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading.remote import send_type_as_recipe
from llminfer.grading.support import make_request
from llminfer.kv.block_pool import BlockPool, blocks_needed
from llminfer.sampling import SamplingParams

CHAPTER = "chapters/engine/08_scheduling"
BLOCK_SIZE = 16


# The requests cross to the answer's process as (id, tokens, tokens computed), rebuilt there by make_request.
send_type_as_recipe(Sequence, lambda seq: wire.Recipe("sequence", (seq.request_id, seq.num_tokens,
                                                                   seq.num_computed_tokens)))


def reference_schedule_step(running: list[Sequence], waiting: list[Sequence], max_num_batched_tokens: int,
                            max_num_seqs: int) -> dict[str, int]:
    """What llminfer's `Scheduler.schedule` hands out, run on copies of the requests in an ample block pool."""
    requests = [*running, *waiting]
    pool = BlockPool(sum(blocks_needed(r.num_tokens, BLOCK_SIZE) for r in requests) + 1, BLOCK_SIZE,
                     enable_prefix_caching=False)
    scheduler = Scheduler(pool, max_num_seqs, max_num_batched_tokens)
    for request in running:
        copy = make_request(request.request_id, request.num_tokens, request.num_computed_tokens)
        copy.status = RequestStatus.RUNNING
        pool.allocate(copy.block_table, copy.num_computed_tokens)
        scheduler.running.append(copy)
    for request in waiting:
        scheduler.add(make_request(request.request_id, request.num_tokens, request.num_computed_tokens))
    return {seq.request_id: n for seq, n in scheduler.schedule().scheduled}


def _expect_plan(actual: object, expected: dict[str, int], budget: int) -> str:
    if not isinstance(actual, dict):
        raise Mismatch(f"the plan is a {type(actual).__name__}, expected a dict {{request_id: tokens}}")
    for request_id, n in actual.items():
        if not isinstance(n, Integral) or isinstance(n, bool):
            raise Mismatch(f"request {request_id!r} gets {n!r}, expected a whole number of tokens")
    if actual == expected:
        return f"{len(expected)} requests, {sum(expected.values())} of {budget} tokens"
    total = sum(actual.values())
    if total > budget:
        raise Mismatch(f"the plan hands out {total} tokens, over the budget of {budget}: {actual}")
    for request_id in [*expected, *actual]:
        got, want = actual.get(request_id), expected.get(request_id)
        if got != want:
            raise Mismatch(f"request {request_id!r} gets {_tokens(got)}, expected {_tokens(want)}; "
                           f"the plan is {actual}, expected {expected}")
    raise AssertionError("unreachable: the plans differ somewhere")


def _tokens(n: int | None) -> str:
    return "nothing (not in the plan)" if n is None else f"{n} token{'s' if n != 1 else ''}"


def _step_test(running: list[tuple[str, int, int]], waiting: list[tuple[str, int]], budget: int, max_num_seqs: int):
    """running: (id, num_tokens, num_computed_tokens); waiting: (id, prompt length), in arrival order."""
    def build():
        return ([make_request(*r) for r in running], [make_request(*w) for w in waiting])

    def run(schedule_step) -> str:
        expected = reference_schedule_step(*build(), budget, max_num_seqs)
        return _expect_plan(schedule_step(*build(), budget, max_num_seqs), expected, budget)

    return run


def _random_states(schedule_step, seed: int = 101, cases: int = 40) -> str:
    rng = random.Random(seed)
    for case in range(cases):
        running = []
        for i in range(rng.randint(0, 6)):
            num_tokens = rng.randint(2, 80)
            # Mostly decodes (one token left); sometimes a prompt part-way through its chunked prefill.
            computed = num_tokens - 1 if rng.random() < 0.7 else rng.randint(0, num_tokens - 1)
            running.append((f"r{i}", num_tokens, computed))
        waiting = [(f"w{i}", rng.randint(1, 90)) for i in range(rng.randint(0, 6))]
        budget, max_num_seqs = rng.randint(1, 128), rng.randint(max(len(running), 1), 10)
        try:
            _step_test(running, waiting, budget, max_num_seqs)(schedule_step)
        except Mismatch as exc:
            raise Mismatch(f"case {case} (budget {budget}, max_num_seqs {max_num_seqs}, running {running}, "
                           f"waiting {waiting}): {exc}") from None
    return f"{cases} random states, all equal"


SCHEDULE_STEP_TESTS = (
    ExerciseTest("decodes only: each of 3 running requests gets 1 token", 1,
                 _step_test([("a", 20, 19), ("b", 7, 6), ("c", 31, 30)], [], 64, 8)),
    ExerciseTest("running requests first, then waiting ones in arrival order", 2,
                 _step_test([("a", 20, 19), ("b", 7, 6)], [("c", 10), ("d", 20), ("e", 5)], 25, 8)),
    ExerciseTest("chunked prefill: a prompt larger than what is left gets a chunk", 2,
                 _step_test([("a", 9, 8)], [("b", 40), ("c", 3)], 32, 8)),
    ExerciseTest("a running request part-way through its prompt gets its next chunk", 1,
                 _step_test([("a", 12, 11), ("b", 50, 16)], [("c", 4)], 20, 8)),
    ExerciseTest("a budget used up exactly: the next request is not in the plan", 1,
                 _step_test([("a", 30, 20), ("b", 5, 4)], [("c", 6)], 11, 8)),
    ExerciseTest("max_num_seqs counts the running requests too", 2,
                 _step_test([("a", 8, 7), ("b", 9, 8)], [("c", 3), ("d", 4), ("e", 5)], 100, 3)),
    ExerciseTest("nothing running, nothing waiting: an empty plan", 1, _step_test([], [], 16, 4)),
    ExerciseTest("40 random states", 2, _random_states, visible=False),
)

EXERCISES = [
    Exercise("schedule_step", "one step of the token-budget scheduler", CHAPTER, "schedule_step",
             reference_schedule_step, SCHEDULE_STEP_TESTS, mirrors=("llminfer.engine.scheduler",)),
]
