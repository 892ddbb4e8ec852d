"""Wrong scheduling policies (the exercise asks for shortest prompt first)."""

from collections import deque

from llminfer.engine.scheduler import Scheduler
from llminfer.engine.sequence import RequestStatus


def _by_length(waiting, reverse=False):
    return deque(sorted(waiting, key=lambda seq: seq.num_tokens - seq.num_computed_tokens, reverse=reverse))


class FirstComeFirstServed(Scheduler):
    """The base rule unchanged: right in every way but the one asked for."""


class LongestFirst(Scheduler):
    def schedule(self):
        self.waiting = _by_length(self.waiting, reverse=True)
        return super().schedule()


class OneAtATime(Scheduler):
    """Shortest first, but a request is admitted only when nothing runs: correct, and very slow."""

    def schedule(self):
        queue = list(_by_length(self.waiting))
        admit = [] if self.running else queue[:1]
        self.waiting = deque(admit)
        try:
            return super().schedule()
        finally:
            self.waiting.extend(seq for seq in queue if seq not in admit)


class RunToCompletion(Scheduler):
    """Shortest first, but a new batch starts only when the last one has finished (dynamic batching)."""

    def schedule(self):
        self.waiting = _by_length(self.waiting)
        if not self.running:
            return super().schedule()
        held, self.waiting = self.waiting, deque()
        try:
            return super().schedule()
        finally:
            self.waiting.extend(held)


class NeverAdmits(Scheduler):
    """Serves the running requests only: nothing ever starts (a deadlock at the first step)."""

    def schedule(self):
        held, self.waiting = self.waiting, deque()
        try:
            return super().schedule()
        finally:
            self.waiting.extend(held)


class DropsTheLongest(Scheduler):
    """Sheds load by forgetting the longest waiting request."""

    def schedule(self):
        self.waiting = _by_length(self.waiting)
        if len(self.waiting) > 5:
            self.waiting.pop()
        return super().schedule()


class OverBudget(Scheduler):
    """Shortest first, with the budget off by one."""

    def schedule(self):
        self.waiting = _by_length(self.waiting)
        self.max_num_batched_tokens += 1
        try:
            return super().schedule()
        finally:
            self.max_num_batched_tokens -= 1


class KeepsBlocks(Scheduler):
    """Shortest first, but a finished request keeps its KV blocks."""

    def schedule(self):
        self.waiting = _by_length(self.waiting)
        return super().schedule()

    def finish(self, seq, reason, stop_reason=None):
        if seq.status is RequestStatus.RUNNING:
            self.running.remove(seq)
        seq.finish(reason, stop_reason)


WRONG = {
    "scheduling_policy": {
        "first come first served": FirstComeFirstServed,
        "longest prompt first": LongestFirst,
        "one request at a time": OneAtATime,
        "run each batch to completion": RunToCompletion,
        "never admits a waiting request": NeverAdmits,
        "drops a request": DropsTheLongest,
        "exceeds the token budget": OverBudget,
        "does not return blocks": KeepsBlocks,
    },
}
