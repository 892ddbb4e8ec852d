"""`check("rope")` in a notebook: find the student's answer by name, grade it, print a per-test table.

It never raises: a missing definition, a stub or a crash scores 0 and the notebook goes on.
"""

from __future__ import annotations

import inspect
import sys

from llminfer.grading.exercise import ExerciseResult
from llminfer.grading.registry import get_exercise
from llminfer.grading.runner import grade_exercise


def check(exercise_id: str, answer: object | None = None, timeout: float | None = None) -> ExerciseResult | None:
    """Grade `answer` (default: the caller's definition of the exercise's name) and print the table."""
    try:
        exercise = get_exercise(exercise_id)
        if answer is None:
            caller = inspect.currentframe().f_back
            namespaces = ([caller.f_globals] if caller else []) + [vars(sys.modules["__main__"])]
            answer = next((space[exercise.target] for space in namespaces if exercise.target in space), None)
        result = grade_exercise(exercise, answer, timeout)
    except Exception as exc:  # a typo in the id, a bad timeout: say so, and let the notebook go on
        print(f"check({exercise_id!r}) could not run: {exc}")
        return None
    print(result.table())
    return result
