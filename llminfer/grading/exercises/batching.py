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
import time
from functools import cache, lru_cache

import torch

from llminfer.engine.scheduler import Scheduler, SchedulerOutput
from llminfer.engine.sequence import RequestStatus
from llminfer.grading.compare import Mismatch
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading.remote import RemoteAnswer
from llminfer.grading.support import AMPLE, SCARCE, Served, Workload
from llminfer.grading.support import serve as support_serve

CHAPTER = "chapters/engine/07_batching"
FULL_MARKS_STEPS, SOME_MARKS_STEPS = 1.25, 2.0   # of the reference scheduler's steps


class ReferenceShortestPromptFirst(Scheduler):
    """Shortest prompt first: before every step, order the waiting queue by the tokens each request has to
    compute (a stable sort: ties keep their arrival order), then apply the base rule."""

    def schedule(self) -> SchedulerOutput:
        self.waiting = deque(sorted(self.waiting, key=lambda seq: seq.num_tokens - seq.num_computed_tokens))
        return super().schedule()


class _Replay(Scheduler):
    """Schedules exactly the steps a policy planned in the answer's process (`plans`), checking that each can be
    carried out: the engine here then computes every token, so what the tests judge happened in this process."""

    plans: tuple = ()

    def schedule(self) -> SchedulerOutput:
        step = getattr(self, "step", 0)
        self.step = step + 1
        if step >= len(self.plans):
            raise Mismatch(f"the policy's run ended after {len(self.plans)} steps with requests unfinished")
        scheduled, preempted = self.plans[step]
        out = SchedulerOutput()
        requests = {seq.request_id: seq for seq in [*self.running, *self.waiting]}
        for request_id in preempted:
            seq = requests.get(request_id)
            if seq is None or seq not in self.running:
                raise Mismatch(f"step {step}: the plan preempts request {request_id!r}, which is not running")
            self.running.remove(seq)
            self._preempt(seq)
            out.preempted.append(seq)
        for request_id, n in scheduled:
            seq = requests.get(request_id)
            if seq is None or any(seq is done for done, _ in out.scheduled):
                raise Mismatch(f"step {step}: the plan schedules request {request_id!r} twice, or one that has "
                               "finished or does not exist")
            if seq in self.waiting:
                self.waiting.remove(seq)
                seq.num_computed_tokens, seq.block_hashes, seq.status = 0, [], RequestStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time, seq.num_cached_tokens = time.perf_counter(), 0
                self.running.append(seq)
                out.prefix_hits[request_id] = 0
            pending = seq.num_tokens - seq.num_computed_tokens
            if not 1 <= n <= pending:
                raise Mismatch(f"step {step}: the plan gives request {request_id!r} {n} tokens with {pending} to compute")
            if not self.pool.allocate(seq.block_table, seq.num_computed_tokens + n):
                raise Mismatch(f"step {step}: the plan gives request {request_id!r} {n} tokens, but its KV blocks do "
                               f"not fit in the {self.pool.num_free_blocks} free ones")
            out.scheduled.append((seq, n))
        return out


def _plans(data: object) -> tuple:
    """The plans as the answer's process sent them, checked to be ([(id, tokens), ...], [ids]) per step."""
    def pair(item) -> bool:
        return type(item) is tuple and len(item) == 2 and type(item[0]) is str and type(item[1]) is int

    if type(data) is not list or not all(
            type(plan) is tuple and len(plan) == 2 and type(plan[0]) is list and all(map(pair, plan[0]))
            and type(plan[1]) is list and all(type(i) is str for i in plan[1]) for plan in data):
        raise Mismatch("the policy's run did not come back as a list of steps")
    return tuple((tuple(plan[0]), tuple(plan[1])) for plan in data)


def serve(policy, workload: Workload) -> Served:
    """Serve `workload` with `policy`. An answer in another process runs the workload there and sends the steps it
    planned; they are replayed here, by a scheduler that checks each one, on this process's engine."""
    if not isinstance(policy, RemoteAnswer):
        return support_serve(policy, workload)
    return _replayed(_plans(policy.harness("policy_plans", workload.plain())), workload)


@lru_cache(maxsize=8)
def _replayed(plans: tuple, workload: Workload) -> Served:
    replay = type("Replay", (_Replay,), {"plans": plans})
    return support_serve(replay, workload)


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
             "ShortestPromptFirst", ReferenceShortestPromptFirst, POLICY_TESTS, timeout=60.0, setup=_prepare,
             warm=("batching_model",)),
]
