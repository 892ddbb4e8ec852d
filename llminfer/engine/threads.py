"""How many CPU threads an engine step uses, chosen by timing steps.

torch splits each large op of a step across its intra-op threads, and every op ends in a barrier where
the threads wait for the slowest one. On an idle machine two threads make a step of the tiny model
about 1.6x faster than one. When another program keeps a core busy, the OS parks one of our threads
for a time slice now and then, every one of the step's ~100 barriers waits for it, and the step runs
2-4x slower than on a single thread, which never waits. No fixed setting is right for both cases, and
the load changes while the engine runs. So on the CPU the engine measures: it times steps on each
candidate thread count, interleaved so that both see the same load and nearly the same batch, keeps
the fastest, and tries the others again from time to time (more often after a step suddenly slows).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PROBE_ROUNDS = 2          # steps per candidate in one probe, alternated with the current choice
FIRST_INTERVAL = 8        # steps between probes at first and after a switch ...
MAX_INTERVAL = 128        # ... doubling up to this while the choice keeps winning (a probe costs ~2 slow steps)
MIN_GAIN = 1.1            # a candidate must be this much faster to replace the current choice
CLEAR_MARGIN = 2.0        # a probe step this much slower than usual, or faster than the last step on the
FAST_GROWTH = 4           # current choice, settles the probe at once; after a clear loss the next waits longer
SLOWDOWN = 0.6            # a step this much slower (per unit of work) than usual triggers an early probe
MIN_SECONDS = 2e-3        # shorter steps are not timed: too noisy to compare


def candidate_threads(max_threads: int) -> list[int]:
    """max_threads, its halves, down to 1: [8, 4, 2, 1], [6, 3, 1], [2, 1]."""
    out = [max_threads]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


class ThreadTuner:
    """Picks torch's intra-op thread count for each step by measuring seconds per unit of work.

    The best count depends on the step's size as well as on the load: a step of a few decode tokens is mostly
    fixed per-op costs, which a second thread only adds to, while a prefill of 2048 tokens splits well. So
    steps are sorted by work into buckets a factor of 16 apart, and each bucket keeps its own choice."""

    def __init__(self, max_threads: int):
        if not isinstance(max_threads, int) or isinstance(max_threads, bool) or max_threads < 1:
            raise ValueError(f"cpu threads must be a positive int, got {max_threads!r}")
        self.candidates = candidate_threads(max_threads)
        self.choices: dict[int, ThreadChoice] = {}     # work bucket -> its choice
        self.switches: list[tuple[int, int]] = []      # (step index, new thread count), for the chapters
        self._latest: ThreadChoice | None = None

    @staticmethod
    def bucket(work: float) -> int:
        return max(0, int(work).bit_length() // 4)    # factors of 16: work below 16, 16-255, 256-4095, ...

    def _choice(self, work: float) -> ThreadChoice:
        key = self.bucket(work)
        if key not in self.choices:   # a new size starts from the latest size's choice: the load is the same
            start = self.candidates[0] if self._latest is None else self._latest.current
            self.choices[key] = ThreadChoice(self.candidates, self.switches, start)
        self._latest = self.choices[key]
        return self._latest

    @property
    def current(self) -> int:
        """The choice for the latest step's size."""
        return self.candidates[0] if self._latest is None else self._latest.current

    def threads_for_step(self, work: float) -> int:
        """The thread count to use for the next step, of `work` units (`step_work`)."""
        return self._choice(work).threads_for_step()

    def record(self, threads: int, seconds: float, work: float, step: int) -> None:
        """Report how long a step of `work` units took on `threads` threads."""
        self._choice(work).record(threads, seconds, work, step)


class ThreadChoice:
    """The thread count for steps of one size: timed on each candidate, kept while it stays the fastest."""

    def __init__(self, candidates: list[int], switches: list[tuple[int, int]], current: int):
        self.candidates = candidates
        self.current = current
        self.interval = FIRST_INTERVAL
        self.steps_to_probe = 0                   # probe at the first timed steps
        self.plan: list[int] = []                 # thread counts of the probe in progress, one per step
        self.samples: dict[int, list[float]] = {}  # seconds per unit of work, per candidate, in this probe
        self.usual: float | None = None            # recent seconds per unit of work on `current`
        self.last: float | None = None             # the latest of them
        self.switches = switches                   # shared with the tuner: (step index, new thread count)

    def threads_for_step(self) -> int:
        if not self.plan and self.steps_to_probe <= 0 and len(self.candidates) > 1:
            self.plan = self._probe_plan()
            self.samples = {}
        return self.plan[0] if self.plan else self.current

    def _probe_plan(self) -> list[int]:
        """The neighbours of the current choice, each alternated with it: [c, cur, c, cur, ...]."""
        i = self.candidates.index(self.current)
        neighbours = self.candidates[max(i - 1, 0):i] + self.candidates[i + 1:i + 2]
        return [t for n in neighbours for _ in range(PROBE_ROUNDS) for t in (n, self.current)]

    def record(self, threads: int, seconds: float, work: float, step: int) -> None:
        timed = seconds >= MIN_SECONDS and work > 0
        if self.plan:
            if timed:
                self.plan.pop(0)
                cost = seconds / work
                self.samples.setdefault(threads, []).append(cost)
                if threads != self.current and self.usual is not None and cost > CLEAR_MARGIN * self.usual:
                    # Under load a probe on too many threads can be 5-10x slower: one such step settles it.
                    self.plan = []
                    self.interval = min(FAST_GROWTH * self.interval, MAX_INTERVAL)
                    self.steps_to_probe = self.interval
                elif threads != self.current and self.last is not None and cost * CLEAR_MARGIN < self.last:
                    self.plan = []   # and so does one step twice as fast as the current choice's last
                    self._switch(threads, step)
                elif not self.plan:
                    self._decide(step)
            return
        self.steps_to_probe -= 1
        if not timed:
            return
        cost = seconds / work
        if self.usual is not None and cost * SLOWDOWN > self.usual:   # the load changed: look again soon
            self.steps_to_probe = min(self.steps_to_probe, 1)
            self.interval = FIRST_INTERVAL
        self.usual = cost if self.usual is None else 0.8 * self.usual + 0.2 * cost
        self.last = cost

    def _decide(self, step: int) -> None:
        costs = {t: statistics.median(c) for t, c in self.samples.items()}
        best = min(costs, key=costs.get)
        if best != self.current and costs[best] * MIN_GAIN < costs[self.current]:
            self._switch(best, step)
            return
        self.interval = min(2 * self.interval, MAX_INTERVAL)
        self.usual = costs[self.current]
        self.steps_to_probe = self.interval

    def _switch(self, threads: int, step: int) -> None:
        self.current, self.interval, self.steps_to_probe = threads, FIRST_INTERVAL, FIRST_INTERVAL
        self.usual = self.last = statistics.median(self.samples[threads])
        self.switches.append((step, threads))


def step_work(rows: list[tuple[int, int]], config) -> float:
    """A step's work in units of one token through the weights: each of a request's n new tokens costs one
    unit plus its attention over `context` keys, weighted by FLOPs (2 per weight per token against 4 per
    head dimension per key). `rows` holds (n, context) per request. Only ratios between similar steps
    matter, so the weighting need not be exact."""
    per_layer = (config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
                 + 3 * config.hidden_size * config.intermediate_size)
    attention_per_key = 4 * config.num_heads * config.head_dim / (2 * per_layer)
    return sum(n * (1 + context * attention_per_key) for n, context in rows)


def use_threads(threads: int) -> None:
    """Set torch's intra-op threads (the C attention kernel follows them), only if they change: a change
    costs the next parallel region ~0.2 ms."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextmanager
def borrowed_threads(threads: int | None) -> Iterator[None]:
    """Run the block on `threads` threads (None: as they are) and give the caller's count back after."""
    caller = torch.get_num_threads()
    try:
        if threads is not None:
            use_threads(threads)
        yield
    finally:
        use_threads(caller)
