"""Graded exercises: `check("id")` in a notebook, and the `llminfer grade` command for instructors.

An exercise (`Exercise`) names the function or class a student writes, the chapter that teaches it,
its reference (llminfer's own implementation) and behavioural tests with points. Each module in
`llminfer/grading/exercises/` adds its exercises to the registry.
"""

from llminfer.grading.check import check
from llminfer.grading.compare import Mismatch, expect_close, expect_equal_number, expect_tensor, seeded
from llminfer.grading.exercise import Exercise, ExerciseResult, ExerciseTest, Outcome
from llminfer.grading.registry import all_exercises, get_exercise
from llminfer.grading.runner import grade_exercise

__all__ = [
    "Exercise",
    "ExerciseResult",
    "ExerciseTest",
    "Mismatch",
    "Outcome",
    "all_exercises",
    "check",
    "expect_close",
    "expect_equal_number",
    "expect_tensor",
    "get_exercise",
    "grade_exercise",
    "seeded",
]
