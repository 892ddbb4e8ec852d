"""Grade one exercise: run each of its tests here, against the student's answer served by another process."""

from __future__ import annotations

from llminfer.grading.contained import StudentProcess
from llminfer.grading.exercise import Exercise, ExerciseResult, Outcome
from llminfer.grading.remote import run_test_in_fork


def grade_exercise(exercise: Exercise, candidate: object | None, timeout: float | None = None,
                   process: StudentProcess | None = None) -> ExerciseResult:
    """Run every test of `exercise` with `timeout` seconds each (default: the exercise's own).

    The answer is `candidate`, an object in this process (None: nothing was defined, every test fails), served
    to each test by a forked child; or, with `process`, the answer named `exercise.target` in that student
    process. Either way the test and its verdict run here, the answer there."""
    timeout = exercise.timeout if timeout is None else timeout
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    result = ExerciseResult(exercise.id, exercise.title)
    missing = candidate is None if process is None else exercise.target not in process.defined
    problem = f"no function or class named {exercise.target!r} is defined" if missing else None
    if problem is None and exercise.setup is not None:
        try:
            exercise.setup()
        except Exception as exc:  # the grader's own preparation failed: no test can run, none may pass
            problem = f"the grader could not prepare this exercise: {type(exc).__name__}: {exc}"
    for test in exercise.tests:
        if problem is not None:
            passed, message, printed = False, problem, ""
        elif process is not None:
            passed, message, printed = process.run_test(exercise.target, test.run, timeout)
        else:
            # The reference is llminfer's own code: nothing to switch off for it.
            mirrors = () if candidate is exercise.reference else exercise.mirrors
            passed, message, printed = run_test_in_fork(test.run, candidate, mirrors, timeout)
        result.outcomes.append(Outcome(test.name, test.points, passed, message, test.visible, printed))
    return result
