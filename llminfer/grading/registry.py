"""Every exercise the grader knows: each module in `llminfer/grading/exercises/` lists its own in
`EXERCISES`, so adding exercises is adding a module."""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import cache

from llminfer.grading import exercises as _package
from llminfer.grading.exercise import Exercise


@cache
def all_exercises() -> dict[str, Exercise]:
    """Exercise id -> exercise, in the book's order (by chapter, then as each module lists them)."""
    found: dict[str, Exercise] = {}
    targets: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(_package.__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{_package.__name__}.{info.name}")
        for exercise in module.EXERCISES:
            if exercise.id in found:
                raise ValueError(f"two exercises have the id {exercise.id!r} (one in {info.name}.py)")
            if exercise.target in targets:
                raise ValueError(f"exercises {targets[exercise.target]!r} and {exercise.id!r} both ask for "
                                 f"{exercise.target!r}; the grader finds an answer by its name, so names must differ")
            found[exercise.id] = exercise
            targets[exercise.target] = exercise.id
    return dict(sorted(found.items(), key=lambda item: chapter_number(item[1].chapter)))


def chapter_number(chapter: str) -> tuple[int, str]:
    """The book's order: "chapters/deployment/11_serving" -> (11, ...); the folder names do not sort by part."""
    digits = re.match(r"\d+", chapter.rsplit("/", 1)[-1])
    return (int(digits.group()) if digits else 0, chapter)


def get_exercise(exercise_id: str) -> Exercise:
    """The exercise with this id; a clear error listing the known ids otherwise."""
    exercises = all_exercises()
    if exercise_id not in exercises:
        raise ValueError(f"unknown exercise {exercise_id!r}; the exercises are: {', '.join(exercises)}")
    return exercises[exercise_id]
