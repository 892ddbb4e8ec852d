"""The token-budget scheduler, driven without a model: every scheduled token is "computed" and a request
that has computed all its tokens samples token 0."""

import random

from llminfer.engine.scheduler import Scheduler
from llminfer.engine.sequence import RequestStatus, Sequence
from llminfer.kv.block_pool import BlockPool
from llminfer.sampling import SamplingParams


def request(name: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(name, None, list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=max_tokens),
                    frozenset())


def run_step(scheduler: Scheduler):
    """One step of a fake engine; returns the plan as {request id: tokens}."""
    plan = scheduler.schedule()
    for seq, n in plan.scheduled:
        seq.num_computed_tokens += n
        assert seq.num_computed_tokens <= seq.num_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(0)
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
    return plan


def test_running_first_then_waiting_under_the_token_budget_with_chunked_prefill():
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=32)
    a, b, c = request("a", 10), request("b", 20), request("c", 30)
    for seq in (a, b, c):
        scheduler.add(seq)
    plan = run_step(scheduler)
    assert [(s.request_id, n) for s, n in plan.scheduled] == [("a", 10), ("b", 20), ("c", 2)]  # c is chunked
    plan = run_step(scheduler)
    assert [(s.request_id, n) for s, n in plan.scheduled] == [("a", 1), ("b", 1), ("c", 28)]  # decodes, then c's rest
    assert c.num_output_tokens == 1  # c sampled after its last chunk


def test_max_num_seqs_caps_the_running_set():
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(5):
        scheduler.add(request(str(i), 3))
    plan = run_step(scheduler)
    assert [s.request_id for s, _ in plan.scheduled] == ["0", "1"] and len(scheduler.waiting) == 3


def test_preemption_takes_the_newest_request_and_keeps_its_tokens():
    pool = BlockPool(num_blocks=4, block_size=2)                 # 8 token slots
    scheduler = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = request("old", 3, max_tokens=4), request("new", 3, max_tokens=4)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)               # both prefill 3 tokens (2 blocks each) and sample one token
    plan = run_step(scheduler)        # both decode at position 3: still within their 2 blocks
    assert len(plan.scheduled) == 2 and pool.num_free_blocks == 0
    tokens_before = list(new.token_ids)
    plan = run_step(scheduler)        # position 4 needs a third block: the newest request gives its blocks back
    assert [s.request_id for s in plan.preempted] == ["new"]
    assert [s.request_id for s, _ in plan.scheduled] == ["old"]
    assert new.status is RequestStatus.WAITING and scheduler.waiting[0] is new
    assert new.token_ids == tokens_before and new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_preemptions == 1
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert old.num_output_tokens == 4 and new.num_output_tokens == 4
    assert pool.num_free_blocks == pool.num_blocks


def test_nothing_new_is_admitted_in_a_step_that_preempted():
    pool = BlockPool(num_blocks=4, block_size=2)
    scheduler = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    scheduler.add(request("old", 3, max_tokens=8))
    scheduler.add(request("new", 3, max_tokens=8))
    run_step(scheduler)
    run_step(scheduler)
    scheduler.add(request("late", 1))
    plan = run_step(scheduler)
    assert plan.preempted and "late" not in {s.request_id for s, _ in plan.scheduled}


def test_a_random_workload_finishes_within_every_limit_and_returns_every_block():
    rng = random.Random(0)
    pool = BlockPool(num_blocks=24, block_size=4)                # 96 slots for up to 12 requests of <= 40 tokens
    scheduler = Scheduler(pool, max_num_seqs=6, max_num_batched_tokens=24)
    seqs = [request(str(i), rng.randint(1, 30), max_tokens=rng.randint(1, 10)) for i in range(60)]
    for seq in seqs:
        scheduler.add(seq)
    preemptions = 0
    while scheduler.has_unfinished():
        plan = run_step(scheduler)
        assert plan.num_tokens <= 24 and len(plan.scheduled) <= 6 and plan.scheduled
        preemptions += len(plan.preempted)
    assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert preemptions > 0 and pool.num_free_blocks == pool.num_blocks
