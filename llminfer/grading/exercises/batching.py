"""Chapter 7, batching: a scheduling policy, written as a `Scheduler` subclass and run inside the real engine.

The policy asked for is shortest prompt first: the token-budget rule of `Scheduler`, but the waiting
request admitted next is the one with the fewest tokens to compute. Each test serves a fixed workload
(the small shipped model, greedy, EOS ignored, so every request produces exactly its number of tokens)
with `LLMEngine(..., scheduler_cls=the policy)` and checks what any policy owes: every request finishes
with the tokens the reference scheduler produces, every KV block comes back, no step exceeds the token
budget. Throughput is counted in engine steps against llminfer's `Scheduler` (deterministic, unlike
wall time).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from functools import cache

import torch

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.scheduler import Scheduler, SchedulerOutput
from llminfer.grading.compare import Mismatch
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.models.loader import load_model
from llminfer.sampling import SamplingParams

CHAPTER = "chapters/engine/07_batching"
MODEL = "tiny-shakespeare-draft"
FULL_MARKS_STEPS, SOME_MARKS_STEPS = 1.25, 2.0   # of the reference scheduler's steps


class ReferenceShortestPromptFirst(Scheduler):
    """Shortest prompt first: before every step, order the waiting queue by the tokens each request has to
    compute (a stable sort: ties keep their arrival order), then apply the base rule."""

    def schedule(self) -> SchedulerOutput:
        self.waiting = deque(sorted(self.waiting, key=lambda seq: seq.num_tokens - seq.num_computed_tokens))
        return super().schedule()


@dataclass(frozen=True)
class Workload:
    """Requests (prompt token ids, output length) and the engine that serves them."""

    requests: tuple[tuple[tuple[int, ...], int], ...]
    num_kv_blocks: int
    block_size: int = 8
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 32
    max_model_len: int = 64


def _requests(seed: int, count: int, vocab: int = 2048) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Random prompts of 3 to 40 token ids (2048: the shipped models' vocabulary) and 4 to 20 output tokens."""
    rng = random.Random(seed)
    return tuple((tuple(rng.randrange(vocab) for _ in range(rng.randint(3, 40))), rng.randint(4, 20))
                 for _ in range(count))


AMPLE = Workload(_requests(seed=7, count=10), num_kv_blocks=64)
SCARCE = Workload(AMPLE.requests, num_kv_blocks=9)   # room for about two requests: the engine must preempt


@dataclass
class Served:
    """One run of a workload: every request's output tokens, the engine (its trace and pool), and the steps."""

    outputs: dict[str, list[int]]
    engine: LLMEngine

    @property
    def steps(self) -> int:
        return len(self.engine.trace)


@cache
def _model():
    return load_model(MODEL, device="cpu", dtype=torch.float32)


def serve(policy: type[Scheduler], workload: Workload) -> Served:
    """Serve every request of `workload` with an engine using `policy`, on one thread (as the forked tests run;
    this model's tiny operations gain nothing from more, and lose much on a busy machine). A Mismatch says what
    went wrong if the policy deadlocks, drops a request or runs far longer than any sensible policy would."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _serve(policy, workload)
    finally:
        torch.set_num_threads(threads)


def _serve(policy: type[Scheduler], workload: Workload) -> Served:
    model, tokenizer = _model()
    engine = LLMEngine(model, tokenizer, block_size=workload.block_size, num_kv_blocks=workload.num_kv_blocks,
                       max_num_seqs=workload.max_num_seqs, max_num_batched_tokens=workload.max_num_batched_tokens,
                       max_model_len=workload.max_model_len, enable_prefix_caching=False, scheduler_cls=policy)
    if not isinstance(engine.scheduler, Scheduler):
        raise Mismatch(f"the policy made a {type(engine.scheduler).__name__}, expected a subclass of Scheduler")
    for index, (prompt, output_len) in enumerate(workload.requests):
        engine.add_request(str(index), {"prompt_token_ids": list(prompt)},
                           SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False))
    plans: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recorded_schedule() -> SchedulerOutput:
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = recorded_schedule
    # Every step computes at least one token, so a policy that needs more steps than this is stuck.
    step_cap = 2 * sum(len(prompt) + output_len for prompt, output_len in workload.requests) + 50
    outputs, step = {}, 0
    while engine.has_unfinished_requests():
        if step == step_cap:
            where = {i: "waiting" if seq in engine.scheduler.waiting else "running"
                     if seq in engine.scheduler.running else "in no queue" for i, seq in engine.requests.items()}
            raise Mismatch(f"not done after {step_cap} engine steps (the reference scheduler needs far fewer): "
                           f"unfinished requests {where}")
        recorded, planned = len(engine.trace), len(plans)
        try:
            finished = [out for out in engine.step() if out.finished]
        except RuntimeError:
            if len(plans) == planned or plans[-1].scheduled or not engine.scheduler.has_unfinished():
                raise   # raised by the policy itself, or by something other than an empty plan
            # The engine refuses a step that schedules nothing while requests wait: say why, in the policy's terms.
            pool = engine.pool
            raise Mismatch(f"step {step}: the policy scheduled nothing while {len(engine.scheduler.waiting)} "
                           f"requests waited and {len(engine.scheduler.running)} ran, with {pool.num_free_blocks} of "
                           f"{pool.num_blocks} KV blocks free (a deadlock)") from None
        if len(engine.trace) == recorded:   # nothing ran, and the scheduler holds nothing: requests were lost
            raise Mismatch(f"step {step}: requests {sorted(engine.requests, key=int)} are neither waiting nor "
                           "running: the policy dropped them")
        outputs.update((out.request_id, out.outputs[0].token_ids) for out in finished)
        step += 1
    return Served(outputs, engine)


@cache
def reference_run(workload: Workload) -> tuple[dict[str, list[int]], int]:
    """The outputs and steps of llminfer's `Scheduler` on `workload`."""
    served = serve(Scheduler, workload)
    return served.outputs, served.steps


def _prepare() -> None:
    """Load the model and serve both workloads with the reference once, before the tests fork."""
    for workload in (AMPLE, SCARCE):
        reference_run(workload)


def _expect_reference_outputs(served: Served, workload: Workload) -> str:
    expected, _ = reference_run(workload)
    missing = sorted(set(expected) - set(served.outputs), key=int)
    if missing:
        raise Mismatch(f"requests {missing} never finished")
    for request_id, tokens in sorted(served.outputs.items(), key=lambda item: int(item[0])):
        if tokens != expected[request_id]:
            first = next((i for i, (a, b) in enumerate(zip(tokens, expected[request_id])) if a != b),
                         min(len(tokens), len(expected[request_id])))
            raise Mismatch(f"request {request_id} produced {len(tokens)} tokens that differ from the reference's "
                           f"{len(expected[request_id])} from token {first} on")
    return f"{len(expected)} requests, same tokens"


def _expect_blocks_back(served: Served) -> str:
    pool = served.engine.pool
    held = [block.block_id for block in pool.blocks if block.ref_count]
    if held or pool.num_free_blocks != pool.num_blocks:
        raise Mismatch(f"after every request finished, {pool.num_used_blocks} of {pool.num_blocks} KV blocks are "
                       f"still in use (blocks {held[:8]}): finished requests must give their blocks back")
    return f"all {pool.num_blocks} blocks free"


def _expect_within_limits(served: Served, workload: Workload) -> str:
    for record in served.engine.trace:
        tokens = sum(record.scheduled.values())
        if tokens > workload.max_num_batched_tokens:
            raise Mismatch(f"step {record.step} computed {tokens} tokens, over the budget of "
                           f"max_num_batched_tokens={workload.max_num_batched_tokens}: {record.scheduled}")
        if len(record.scheduled) > workload.max_num_seqs:
            raise Mismatch(f"step {record.step} ran {len(record.scheduled)} requests, over "
                           f"max_num_seqs={workload.max_num_seqs}")
        empty = [request_id for request_id, n in record.scheduled.items() if n < 1]
        if empty:
            raise Mismatch(f"step {record.step} scheduled requests {empty} for {record.scheduled[empty[0]]} tokens")
    busiest = max(sum(record.scheduled.values()) for record in served.engine.trace)
    return f"at most {busiest} of {workload.max_num_batched_tokens} tokens in a step"


def _correct(policy) -> str:
    return _expect_reference_outputs(serve(policy, AMPLE), AMPLE)


def _blocks_back(policy) -> str:
    return _expect_blocks_back(serve(policy, AMPLE))


def _within_limits(policy) -> str:
    return _expect_within_limits(serve(policy, AMPLE), AMPLE)


def _shortest_first(policy) -> str:
    """Every request admitted in a step is no longer than any request still waiting after it (all arrive at once)."""
    served = serve(policy, AMPLE)
    length = {str(i): len(prompt) for i, (prompt, _) in enumerate(AMPLE.requests)}
    admitted: set[str] = set()
    for record in served.engine.trace:
        new = [request_id for request_id in record.scheduled if request_id not in admitted]
        admitted.update(new)
        still_waiting = [request_id for request_id in length if request_id not in admitted]
        for request_id in new:
            shorter = [w for w in still_waiting if length[w] < length[request_id]]
            if shorter:
                raise Mismatch(f"step {record.step} admitted request {request_id} ({length[request_id]} prompt "
                               f"tokens) while request {shorter[0]} ({length[shorter[0]]} tokens) kept waiting")
    order = sorted(admitted, key=lambda request_id: min(r.step for r in served.engine.trace
                                                        if request_id in r.scheduled))
    return "admitted by prompt length: " + ", ".join(str(length[i]) for i in order)


def _throughput(limit: float):
    def run(policy) -> str:
        served = serve(policy, AMPLE)
        _, reference_steps = reference_run(AMPLE)
        ratio = served.steps / reference_steps
        if ratio > limit:
            raise Mismatch(f"{served.steps} engine steps, {ratio:.2f}x the reference scheduler's {reference_steps} "
                           f"(this test allows {limit:g}x): does it keep max_num_seqs requests running?")
        return f"{served.steps} steps, {ratio:.2f}x the reference scheduler's {reference_steps}"

    return run


def _scarce_memory(policy) -> str:
    served = serve(policy, SCARCE)
    _expect_reference_outputs(served, SCARCE)
    _expect_within_limits(served, SCARCE)
    _expect_blocks_back(served)
    preempted = sum(len(record.preempted) for record in served.engine.trace)
    return f"{served.steps} steps, {preempted} preemptions, same tokens, all blocks free"


POLICY_TESTS = (
    ExerciseTest("admits the shortest waiting prompt first", 2, _shortest_first),
    ExerciseTest("10 requests finish with the reference scheduler's tokens", 2, _correct),
    ExerciseTest("every KV block comes back", 1, _blocks_back),
    ExerciseTest("no step exceeds the token budget or max_num_seqs", 1, _within_limits),
    ExerciseTest(f"throughput: at most {SOME_MARKS_STEPS:g}x the reference scheduler's steps", 1,
                 _throughput(SOME_MARKS_STEPS)),
    ExerciseTest(f"throughput: at most {FULL_MARKS_STEPS:g}x the reference scheduler's steps", 1,
                 _throughput(FULL_MARKS_STEPS)),
    ExerciseTest("a KV pool of 9 blocks: requests are preempted, finish correctly, and give every block back", 2,
                 _scarce_memory),
)

EXERCISES = [
    Exercise("scheduling_policy", "a shortest-prompt-first policy in the real engine", CHAPTER,
             "ShortestPromptFirst", ReferenceShortestPromptFirst, POLICY_TESTS, timeout=60.0, setup=_prepare),
]
