"""What the engine returns, shaped like vLLM's `RequestOutput` so code can switch engines."""

from __future__ import annotations

from dataclasses import dataclass

from llminfer.sampling import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str             # filled in when the request finishes; stream `new_token_ids` before that
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None        # "stop", "length", "abort", "error", or None while running
    stop_reason: int | str | None = None    # the stop token id or stop string, if one ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    new_token_ids: list[int]       # the tokens this step added (what a stream sends); with n > 1, those of
                                   # every completion in index order (diff outputs[i].token_ids to tell apart)
    num_cached_tokens: int         # prompt tokens served by the prefix cache
    metrics: RequestMetrics
    error: str | None = None       # why the request failed, if it did
