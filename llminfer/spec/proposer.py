"""What a proposer gives the engine: up to k draft tokens per request, and the distribution they came from.

The engine asks after every step for the requests that will decode next; the scheduler then counts the
drafts in the token budget like any other tokens, the model scores them all in one pass, and the
verifier keeps an exact prefix of them (`llminfer.spec.verify`). A new method (suffix trees, an
EAGLE head) is a new subclass; nothing else in the engine changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llminfer.engine.sequence import Sequence


@dataclass
class Draft:
    token_ids: list[int]
    # Row i is the distribution token i was drawn from [k, vocab]; None for a deterministic proposer
    # (all of each row's mass on its token), such as n-gram lookup or a greedy draft.
    probs: torch.Tensor | None = None


class Proposer:
    """Drafts tokens for requests about to decode."""

    def __init__(self, num_speculative_tokens: int, max_model_len: int):
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len

    def room(self, seq: Sequence) -> int:
        """How many tokens may be drafted for `seq`: k, but none past the context or past `max_tokens`
        (the token after the drafts is always the verifier's own, so a request one token from its
        limit gets no draft)."""
        room = min(self.k, self.max_model_len - seq.num_tokens)
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(room, 0)

    def propose(self, seqs: list[Sequence]) -> dict[Sequence, Draft]:
        """Drafts for some of `seqs` (a request may get none)."""
        raise NotImplementedError
