"""Chapter 1, from prompt to text: top-p and min-p truncation of the next-token distribution."""

from __future__ import annotations

import torch

from llminfer.grading.compare import Mismatch, expect_close, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.sampling import apply_min_p, apply_top_p

MIRRORS = ("llminfer.sampling",)   # the answer may not call llminfer's own filters

CHAPTER = "chapters/basics/01_prompt_to_text"


def _spread_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits whose rows range from flat to peaked, so truncation keeps few or many tokens."""
    scale = torch.linspace(0.5, 4.0, rows)[:, None]
    return torch.randn(rows, vocab, generator=seeded(seed)) * scale


def _compare(transform, reference, logits: torch.Tensor, name: str, value: float, sort: bool = False) -> str:
    """The student's transform against the reference on `logits`; with `sort`, compare each row's values
    in sorted order (for ties, where which of the tied tokens is kept is free)."""
    expected = reference(logits.clone(), value)
    actual = transform(logits.clone(), value)
    if sort and isinstance(actual, torch.Tensor):
        actual, expected = actual.sort(dim=-1).values, expected.sort(dim=-1).values
    return expect_close(actual, expected, f"the output for {name}={value}")


def _leaves_input(transform, value: float) -> str:
    logits = _spread_logits(3, 40, seed=5)
    before = logits.clone()
    transform(logits, value)
    if not torch.equal(logits, before):
        raise Mismatch("the input logits were changed in place; return a new tensor (masked_fill, not masked_fill_)")
    return "input unchanged"


def _top_p_tests() -> tuple[ExerciseTest, ...]:
    def compare(logits, p, sort=False):
        return lambda f: _compare(f, apply_top_p, logits, "p", p, sort)

    return (
        ExerciseTest("random logits [5, 123], p=0.9", 2, compare(_spread_logits(5, 123, seed=1), 0.9)),
        ExerciseTest("random logits [4, 2048], p=0.5", 2, compare(_spread_logits(4, 2048, seed=2), 0.5)),
        ExerciseTest("small p keeps only the most likely token", 1, compare(_spread_logits(3, 50, seed=3), 1e-4)),
        ExerciseTest("p=1 keeps every token", 1, compare(_spread_logits(2, 17, seed=4), 1.0)),
        # Four equal logits have probabilities of exactly 1/4: p=0.5 is reached with two tokens, not three.
        ExerciseTest("p on a boundary: 4 equal logits, p=0.5 keeps exactly 2", 2,
                     compare(torch.zeros(2, 4), 0.5, sort=True)),
        ExerciseTest("one row of logits [vocab]", 1, compare(_spread_logits(1, 31, seed=6)[0], 0.8)),
        ExerciseTest("the input is not modified", 1, lambda f: _leaves_input(f, 0.7), visible=False),
    )


def _min_p_tests() -> tuple[ExerciseTest, ...]:
    def compare(logits, min_p, sort=False):
        return lambda f: _compare(f, apply_min_p, logits, "min_p", min_p, sort)

    return (
        ExerciseTest("random logits [5, 123], min_p=0.1", 2, compare(_spread_logits(5, 123, seed=11), 0.1)),
        ExerciseTest("random logits [4, 2048], min_p=0.05", 2, compare(_spread_logits(4, 2048, seed=12), 0.05)),
        # Rows with very different peaks: each row's threshold comes from its own most likely token.
        ExerciseTest("each row has its own threshold", 2,
                     compare(torch.cat([_spread_logits(1, 60, seed=13) * 6, _spread_logits(1, 60, seed=14) * 0.2]), 0.2)),
        ExerciseTest("min_p=0 keeps every token", 1, compare(_spread_logits(2, 17, seed=15), 0.0)),
        # Tied most likely tokens sit exactly at the threshold when min_p=1: they are kept.
        ExerciseTest("min_p=1 keeps every token tied for the top", 1,
                     compare(torch.tensor([[2.0, 2.0, 1.0, 2.0, -1.0]]), 1.0)),
        ExerciseTest("one row of logits [vocab]", 1, compare(_spread_logits(1, 31, seed=16)[0], 0.3)),
        ExerciseTest("the input is not modified", 1, lambda f: _leaves_input(f, 0.2), visible=False),
    )


EXERCISES = [
    Exercise("top_p", "top-p (nucleus) filtering of logits", CHAPTER, "apply_top_p", apply_top_p, _top_p_tests(),
             mirrors=MIRRORS),
    Exercise("min_p", "min-p filtering of logits", CHAPTER, "apply_min_p", apply_min_p, _min_p_tests(),
             mirrors=MIRRORS),
]
