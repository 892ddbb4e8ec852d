"""Figures of the engine at work, drawn from its real trace (`LLMEngine.trace`, a list of `StepRecord`).

The trace says, for every step, which requests computed how many tokens, who was preempted, and how
many KV blocks were in use. With each request's prompt length it also says what kind of work each
token was: the prompt computed for the first time (prefill, whole or in chunks), one sampled token fed
back (decode), or tokens computed again after a preemption (recompute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.patches import Patch

KINDS = ("prefill", "decode", "recompute")
KIND_COLORS = {"prefill": "#4C72B0", "decode": "#55A868", "recompute": "#C44E52"}


@dataclass(frozen=True)
class Segment:
    """One request's share of one step: one bar of the Gantt chart, its tokens counted by kind."""

    request_id: str
    step: int
    start: float       # seconds since the engine was created
    duration: float
    prefill: int       # prompt tokens computed for the first time
    decode: int        # generated tokens computed for the first time (one per step)
    recompute: int     # tokens computed before, lost to a preemption, computed again

    @property
    def num_tokens(self) -> int:
        return self.prefill + self.decode + self.recompute

    @property
    def kind(self) -> str:
        """What the bar shows: recompute if any of its tokens are, else prefill or decode."""
        return "recompute" if self.recompute else "prefill" if self.prefill else "decode"


def segments(trace: Sequence, prompt_lens: dict[str, int]) -> list[Segment]:
    """Every (step, request) pair of the trace, in order, with its tokens split by kind.

    Replays each request's `num_computed_tokens`: a preemption resets it to 0, an admission starts it at
    the tokens found in the prefix cache. Positions below the most the request had computed before a
    preemption are recomputed; below its prompt length, prefilled; the rest are decodes.
    """
    computed: dict[str, int] = {}
    lost: dict[str, int] = {}   # the most tokens a request had computed when a preemption took them
    out = []
    for record in trace:
        for request_id in record.preempted:
            lost[request_id] = max(lost.get(request_id, 0), computed.get(request_id, 0))
            computed[request_id] = 0
        for request_id, n in record.scheduled.items():
            first = record.prefix_hits.get(request_id, computed.get(request_id, 0))
            end = first + n
            recompute = max(0, min(end, lost.get(request_id, 0)) - first)
            prefill = max(0, min(end, prompt_lens[request_id]) - (first + recompute))
            out.append(Segment(request_id, record.step, record.start, record.duration, prefill,
                               n - recompute - prefill, recompute))
            computed[request_id] = end
    return out


def tokens_per_step(trace: Sequence, prompt_lens: dict[str, int]) -> dict[str, list[int]]:
    """Tokens computed in each step of the trace, by kind: {kind: [tokens in step 0, step 1, ...]}."""
    counts = {kind: [0] * len(trace) for kind in KINDS}
    index = {record.step: i for i, record in enumerate(trace)}
    for segment in segments(trace, prompt_lens):
        for kind in KINDS:
            counts[kind][index[segment.step]] += getattr(segment, kind)
    return counts


def _bar_extent(segment: Segment, time_axis: bool) -> tuple[float, float]:
    return (segment.start, segment.duration) if time_axis else (segment.step, 0.9)


def plot_gantt(ax, trace: Sequence, prompt_lens: dict[str, int], *, time_axis: bool = True,
               arrivals: dict[str, float] | None = None, title: str = "") -> list[Segment]:
    """One row per request, one bar per step it ran in, coloured by kind; preemptions marked with a cross.

    `arrivals` (seconds on the engine's clock, by request id) draws a thin line from each request's arrival
    to its first step: the time it waited. Returns the segments drawn.
    """
    drawn = segments(trace, prompt_lens)
    order = list(dict.fromkeys([*(arrivals or {}), *(s.request_id for s in drawn)]))
    row = {request_id: i for i, request_id in enumerate(order)}
    bars: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for segment in drawn:
        bars.setdefault((segment.request_id, segment.kind), []).append(_bar_extent(segment, time_axis))
    for (request_id, kind), extents in bars.items():
        ax.broken_barh(extents, (row[request_id] - 0.4, 0.8), facecolors=KIND_COLORS[kind], linewidth=0)
    if arrivals and time_axis:
        first = {}
        for segment in drawn:
            first.setdefault(segment.request_id, segment.start)
        for request_id, arrived in arrivals.items():
            if request_id in first:
                ax.hlines(row[request_id], arrived, first[request_id], colors="0.6", linewidth=1)
            ax.plot(arrived, row[request_id], "|", color="0.3", markersize=5)
    preempted = [(record, request_id) for record in trace for request_id in record.preempted]
    for record, request_id in preempted:
        ax.plot(record.start if time_axis else record.step, row[request_id], "x", color="black", markersize=6)
    kinds = [kind for kind in KINDS if any(s.kind == kind for s in drawn)]
    handles = [Patch(color=KIND_COLORS[kind], label=kind) for kind in kinds]
    if preempted:
        handles.append(ax.plot([], [], "x", color="black", label="preempted")[0])
    if arrivals and time_axis:
        handles.append(ax.plot([], [], "-", color="0.6", label="waiting since arrival")[0])
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylim(len(order) - 0.5, -0.5)
    if len(order) <= 40:
        ax.set_yticks(range(len(order)), order, fontsize=6)
    ax.set_ylabel("request")
    ax.set_xlabel("seconds since the engine started" if time_axis else "engine step")
    if title:
        ax.set_title(title, fontsize=9)
    return drawn


def plot_tokens_per_step(ax, trace: Sequence, prompt_lens: dict[str, int], *, budget: int | None = None,
                         title: str = "") -> dict[str, list[int]]:
    """Stacked bars of the tokens each step computed, by kind, with the token budget as a line."""
    counts = tokens_per_step(trace, prompt_lens)
    steps = [record.step for record in trace]
    bottom = [0] * len(trace)
    for kind in KINDS:
        if any(counts[kind]):
            ax.bar(steps, counts[kind], bottom=bottom, width=1.0, color=KIND_COLORS[kind], label=kind, linewidth=0)
            bottom = [b + c for b, c in zip(bottom, counts[kind], strict=True)]
    if budget is not None:
        ax.axhline(budget, color="black", linestyle=":", linewidth=1, label=f"budget ({budget} tokens)")
    ax.set_xlabel("engine step")
    ax.set_ylabel("tokens computed")
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    return counts


def plot_kv_usage(ax, trace: Sequence, num_blocks: int, *, time_axis: bool = False, label: str | None = None,
                  color: str = "C0") -> list[int]:
    """KV blocks in use after every step, the pool's size, and a red line at each step that preempted.

    Returns the steps that preempted."""
    x = [record.start + record.duration if time_axis else record.step for record in trace]
    ax.step(x, [record.num_used_blocks for record in trace], where="post", color=color, label=label)
    ax.axhline(num_blocks, color=color, linestyle=":", linewidth=1)
    preempting = [record for record in trace if record.preempted]
    for i, record in enumerate(preempting):
        ax.axvline(record.start if time_axis else record.step, color="#C44E52", alpha=0.35, linewidth=1,
                   label="a step that preempted" if i == 0 else None)
    ax.set_xlabel("seconds since the engine started" if time_axis else "engine step")
    ax.set_ylabel("KV blocks in use")
    return [record.step for record in preempting]
