"""Answer key for the exercise `scheduling_policy` (chapter 7, batching): shortest prompt first.

Uses the notebook's building blocks `Scheduler` and `SchedulerOutput` from `llminfer.engine`: the policy is a
`Scheduler` subclass, and the intended design is to reorder the waiting queue and let the base class's
token-budget rule (running first, chunked prefill, max_num_seqs, preemption) do the rest.
"""

from collections import deque

from llminfer.engine import Scheduler  # given by the notebook: the class to subclass
from llminfer.engine.scheduler import SchedulerOutput  # given by the notebook: schedule()'s return type


class ShortestPromptFirst(Scheduler):
    """The engine's token-budget rule, admitting the waiting request with the fewest tokens to compute first."""

    def schedule(self) -> SchedulerOutput:
        # The base rule admits from the front of self.waiting. Put the request with the fewest tokens left to
        # compute there. sorted() is stable, so equal lengths keep their arrival order. Requests preempted in
        # an earlier step are back in the waiting queue, so sorting before every step puts them in place too.
        self.waiting = deque(sorted(self.waiting, key=_tokens_to_compute))
        return super().schedule()


def _tokens_to_compute(seq) -> int:
    return seq.num_tokens - seq.num_computed_tokens
