"""An exercise and what grading it produces: its tests with points, and a per-test outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExerciseTest:
    """One behavioural test: `run(candidate)` returns a short detail if it passes, raises `Mismatch` if not.

    A hidden test counts like any other; only its details stay hidden until grades are published."""

    name: str
    points: float
    run: Callable[[object], str | None]
    visible: bool = True


@dataclass(frozen=True)
class Exercise:
    """A function or class the student writes (`target`), the chapter that teaches it, and its tests.

    `reference` is llminfer's implementation, with the exercise's signature: it earns full marks."""

    id: str
    title: str
    chapter: str               # the book page, e.g. "chapters/basics/01_prompt_to_text"
    target: str                # the name the student's notebook or module defines
    reference: object
    tests: tuple[ExerciseTest, ...]
    timeout: float = 10.0      # seconds per test, unless the caller says otherwise
    # Run once before the tests, in the grading process: what it loads and caches (a model, the reference's
    # results) every test's forked child inherits instead of loading again.
    setup: Callable[[], object] | None = None
    # The library code the answer must not call (modules, or "module:Name"): switched off in the process that
    # serves the answer while its tests run, and flagged when a submission imports it (see `forbidden`).
    mirrors: tuple[str, ...] = ()
    # What the student's process loads before any student code runs, so that each test's child inherits it
    # instead of loading it again (names in `support.WARM`: a model, a tokenizer).
    warm: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("_", "").isalnum():
            raise ValueError(f"exercise id must be letters, digits and underscores, got {self.id!r}")
        if not self.timeout > 0:
            raise ValueError(f"exercise {self.id!r}: timeout must be > 0 seconds, got {self.timeout}")
        if not self.tests:
            raise ValueError(f"exercise {self.id!r} has no tests")
        names = [test.name for test in self.tests]
        if len(set(names)) != len(names):
            raise ValueError(f"exercise {self.id!r} has two tests with the same name: {names}")
        for test in self.tests:
            if not test.points > 0:
                raise ValueError(f"exercise {self.id!r}: test {test.name!r} must have points > 0, got {test.points}")

    @property
    def max_score(self) -> float:
        return sum(test.points for test in self.tests)


@dataclass
class Outcome:
    """What one test found: passed or not, why, and the start of what the student's code printed."""

    name: str
    max_points: float
    passed: bool
    message: str
    visible: bool = True
    printed: str = ""

    @property
    def points(self) -> float:
        return self.max_points if self.passed else 0.0


@dataclass
class ExerciseResult:
    exercise_id: str
    title: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(outcome.points for outcome in self.outcomes)

    @property
    def max_score(self) -> float:
        return sum(outcome.max_points for outcome in self.outcomes)

    @classmethod
    def from_dict(cls, data: dict) -> ExerciseResult:
        return cls(data["exercise_id"], data["title"], [Outcome(**outcome) for outcome in data["outcomes"]])

    def table(self) -> str:
        """The per-test report a student reads: result, points, test, and why."""
        width = max(len(outcome.name) for outcome in self.outcomes)
        lines = [f"{self.exercise_id}: {self.title}"]
        for o in self.outcomes:
            why = o.message if o.visible or o.passed else "(hidden test: details once grades are published)"
            lines.append(f"  {'PASS' if o.passed else 'FAIL'}  {_points(o.points):>4}/{_points(o.max_points):<4} "
                         f"{o.name:<{width}}  {why}")
        lines.append(f"  score: {_points(self.score)} / {_points(self.max_score)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.exercise_id}: {_points(self.score)} / {_points(self.max_score)} points>"


def _points(value: float) -> str:
    return f"{value:g}"
