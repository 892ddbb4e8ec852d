"""Grade one exercise: run each of its tests on the student's answer, each in its own child process."""

from __future__ import annotations

from llminfer.grading.exercise import Exercise, ExerciseResult, Outcome
from llminfer.grading.sandbox import run_isolated


def grade_exercise(exercise: Exercise, candidate: object | None, timeout: float | None = None) -> ExerciseResult:
    """Run every test of `exercise` on `candidate` (None: nothing was defined, every test fails), each with
    `timeout` seconds (default: the exercise's own)."""
    timeout = exercise.timeout if timeout is None else timeout
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    result = ExerciseResult(exercise.id, exercise.title)
    problem = f"no function or class named {exercise.target!r} is defined" if candidate is None else None
    if problem is None and exercise.setup is not None:
        try:
            exercise.setup()
        except Exception as exc:  # the grader's own preparation failed: no test can run, none may pass
            problem = f"the grader could not prepare this exercise: {type(exc).__name__}: {exc}"
    for test in exercise.tests:
        if problem is not None:
            passed, message, printed = False, problem, ""
        else:
            passed, message, printed = run_isolated(lambda test=test: test.run(candidate), timeout)
        result.outcomes.append(Outcome(test.name, test.points, passed, message, test.visible, printed))
    return result
