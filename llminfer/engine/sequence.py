"""A request as the engine sees it: its tokens, how many of them are in the KV cache, its blocks.

The one number that drives scheduling is `num_computed_tokens`: the tokens whose keys and values
are already in the cache. A request needs `num_tokens - num_computed_tokens` more tokens computed
before it can sample again. For a new request that is its whole prompt (prefill), for a running
one a single token (decode), and after a preemption everything it had (recompute).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llminfer.sampling import Logprob, SamplingParams

if TYPE_CHECKING:
    from llminfer.spec.proposer import Draft


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]                  # tokens that end this request (its stop tokens, EOS unless ignored)
    generator: torch.Generator | None = None  # its private random stream if seeded
    arrival_time: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(default_factory=list)  # prompt, then every generated token
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks, in order
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0    # prompt tokens found in the prefix cache when first scheduled
    num_preemptions: int = 0
    draft: Draft | None = None    # speculative decoding: tokens proposed for the next step, not yet verified
    num_draft_computed: int = 0   # tokens whose entries the draft model has in its cache
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft.token_ids) if self.draft is not None else 0

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = RequestStatus.FINISHED, reason, stop_reason
        self.finished_time = time.perf_counter()
