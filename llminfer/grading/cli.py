"""`llminfer grade`: grade submissions (notebooks or modules), print the scores, write Gradescope's
results.json; or write the autograder files Gradescope needs.

Each submission file is loaded and graded in its own subprocess (`worker`), each test in a forked
child with a time limit. The exit status is 0 whatever the score; it is non-zero only when grading
itself cannot run (a missing file, an unknown exercise id).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llminfer.grading.exercise import ExerciseResult
from llminfer.grading.gradescope import PACKAGE, results_json, write_autograder
from llminfer.grading.registry import all_exercises, get_exercise
from llminfer.grading.runner import grade_exercise
from llminfer.grading.submission import SUFFIXES

LOAD_BUDGET_S = 300.0   # for loading one submission file, on top of the tests' own time limits


def add_grade_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `llminfer grade` and its options."""
    grade = subparsers.add_parser("grade", help="grade exercise submissions; write Gradescope's results.json")
    grade.add_argument("paths", nargs="*", metavar="PATH",
                       help=f"a submission ({', '.join(SUFFIXES)}) or a folder of them")
    grade.add_argument("--exercise", action="append", default=[], metavar="ID",
                       help="grade this exercise (repeat for more; default: those the submission defines)")
    grade.add_argument("--gradescope", type=Path, metavar="RESULTS_JSON", help="also write Gradescope's results here")
    grade.add_argument("--timeout", type=float, metavar="S",
                       help="seconds allowed per test (default: each exercise's own, 10 for most)")
    grade.add_argument("--make-autograder", type=Path, metavar="DIR",
                       help="write setup.sh and run_autograder for Gradescope into DIR, and grade nothing")
    grade.add_argument("--package", default=PACKAGE, help="what setup.sh pip-installs (pin a commit or version)")
    grade.add_argument("--list", action="store_true", help="list the exercises and exit")
    grade.set_defaults(run=run_grade)


def run_grade(args: argparse.Namespace) -> int:
    """List, write the autograder, or grade and report; 0 whatever the score."""
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    exercises = [get_exercise(i).id for i in args.exercise]
    if args.list:
        for e in all_exercises().values():
            print(f"{e.id:<20} {e.max_score:>3g} points  write {e.target!r}: {e.title} ({e.chapter})")
        return 0
    if args.make_autograder:
        for path in write_autograder(args.make_autograder, exercises or list(all_exercises()), args.timeout,
                                     args.package):
            print(f"wrote {path}")
        return 0
    if not args.paths:
        raise ValueError("nothing to grade: give a submission PATH, or --make-autograder DIR, or --list")
    start = time.perf_counter()
    results, notes = grade_files(submission_files(args.paths), exercises, args.timeout)
    total, most = sum(r.score for r in results), sum(r.max_score for r in results)
    summary = "\n".join([*notes, f"score: {total:g} / {most:g}"])
    for result in results:
        print(result.table() + "\n")
    print(summary)
    if args.gradescope:
        args.gradescope.parent.mkdir(parents=True, exist_ok=True)
        report = results_json(results, time.perf_counter() - start, summary)
        args.gradescope.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def submission_files(paths: list[str]) -> list[Path]:
    """The files to grade: each path given, or the gradable files in a folder given."""
    files = []
    for name in paths:
        path = Path(name).resolve()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                            and ".ipynb_checkpoints" not in p.parts)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(f"cannot grade {name!r}: a submission is a {', '.join(SUFFIXES)} file")
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {name!r}")
    return files


def grade_files(files: list[Path], exercise_ids: list[str], timeout: float | None
                ) -> tuple[list[ExerciseResult], list[str]]:
    """Each exercise graded in the first file that defines its answer (0 points if none does), and notes."""
    graded: dict[str, ExerciseResult] = {}
    notes = []
    for path in files:
        report = _grade_in_subprocess(path, exercise_ids, timeout)
        notes += [f"{path.name}: {line}" for line in report["log"]]
        for data in report["results"]:
            graded.setdefault(data["exercise_id"], ExerciseResult.from_dict(data))
    wanted = exercise_ids or [i for i in all_exercises() if i in graded]
    if not wanted:
        names = ", ".join(e.target for e in all_exercises().values())
        raise ValueError(f"the submission defines none of the exercises' names ({names}); name them with --exercise")
    return [graded.get(i) or grade_exercise(get_exercise(i), None, timeout) for i in wanted], notes


def _grade_in_subprocess(path: Path, exercise_ids: list[str], timeout: float | None) -> dict:
    exercises = [get_exercise(i) for i in exercise_ids] or list(all_exercises().values())
    budget = LOAD_BUDGET_S + sum(len(e.tests) * ((timeout or e.timeout) + 2) for e in exercises)
    with tempfile.TemporaryDirectory() as tmp:
        out, errors = Path(tmp) / "report.json", Path(tmp) / "stderr.txt"
        command = [sys.executable, "-m", "llminfer.grading.worker", str(path), "--out", str(out),
                   *(["--timeout", str(timeout)] if timeout else []),
                   *[arg for i in exercise_ids for arg in ("--exercise", i)]]
        try:
            with open(errors, "w") as stderr:
                subprocess.run(command, cwd=path.parent, stdout=subprocess.DEVNULL, stderr=stderr, timeout=budget,
                               env={**_triton_env(), **os.environ, "MPLBACKEND": "Agg"})
        except subprocess.TimeoutExpired:
            return {"log": [f"grading did not finish in {budget:g} s; nothing in this file was graded"], "results": []}
        if out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return {"log": [f"loading it ended the grading process ({tail[0][:200]}); nothing in this file was graded"],
                "results": []}


def _triton_env() -> dict[str, str]:
    """Without a GPU, Triton kernels run in its interpreter, which `@triton.jit` picks when a kernel is
    defined: the worker must have TRITON_INTERPRET=1 before the submission (or llminfer) defines any."""
    return {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
