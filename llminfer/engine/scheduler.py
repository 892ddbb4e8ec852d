"""The scheduler: which requests run in the next step, and how many tokens each computes.

One rule covers prefill, chunked prefill and decode (vLLM V1's): every step has a budget of
`max_num_batched_tokens`; running requests are served first, in the order they started, each
asking for `num_tokens - num_computed_tokens` (one for a decode); then waiting requests are
admitted while the budget, `max_num_seqs` and free KV blocks allow. A prompt larger than what is
left of the budget gets a chunk now and the rest in later steps.

When a running request needs a block and none is free, the newest running request is preempted:
its blocks go back to the pool and it returns to the front of the waiting queue, keeping every
token it produced; it recomputes their keys and values when it is scheduled again.

With speculative decoding a running request also carries draft tokens: they are only more tokens
to compute, counted in the budget like the others (the ones that do not fit are dropped).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llminfer.engine.sequence import RequestStatus, Sequence
from llminfer.kv.block_pool import BlockPool


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_hits: dict[str, int] = field(default_factory=dict)  # request id -> tokens found in the cache

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. Running requests, oldest first. Making room for one may preempt the newest.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            pending = seq.num_tokens - seq.num_computed_tokens
            n = min(pending + seq.num_draft_tokens, budget)
            if n < pending + seq.num_draft_tokens:
                self._trim_draft(seq, n - pending)
            while not self.pool.allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        # 2. Waiting requests, first come first served (a preempted one is at the front). After a
        # preemption nothing new is admitted: memory is short.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # Reuse cached full blocks of the prefix, but compute at least the last token: its logits are needed.
            # prompt_logprobs needs the logits of every prompt token, so such requests compute them all.
            wants_all_logits = (seq.params.prompt_logprobs is not None
                                and len(seq.prompt_logprobs or ()) < seq.num_prompt_tokens)
            hits, hashes = ([], []) if wants_all_logits else self.pool.find_cached_prefix(
                seq.token_ids, seq.num_tokens - 1)
            cached = len(hits) * self.pool.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.pool.allocate(seq.block_table, cached + n, prefix=hits):
                break
            self.waiting.popleft()
            seq.num_computed_tokens, seq.block_hashes = cached, hashes
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time, seq.num_cached_tokens = time.perf_counter(), cached
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            out.prefix_hits[seq.request_id] = cached
            budget -= n
        return out

    @staticmethod
    def _trim_draft(seq: Sequence, keep: int) -> None:
        """Keep the first `keep` draft tokens (none if keep <= 0)."""
        draft = seq.draft
        if keep <= 0:
            seq.draft = None
        else:
            draft.token_ids = draft.token_ids[:keep]
            draft.probs = None if draft.probs is None else draft.probs[:keep]

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.num_computed_tokens, seq.block_hashes = 0, []
        seq.draft, seq.num_draft_computed = None, 0   # both caches' entries went with the blocks
        seq.status = RequestStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request (finished, aborted or failed) and give its blocks back."""
        if seq.status is RequestStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is RequestStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.block_table)
        seq.finish(reason, stop_reason)
