"""`llminfer grade`: grade submissions (notebooks or modules), print the scores, write Gradescope's
results.json; or write the autograder files Gradescope needs.

Student code never runs in this process. Each submission file is loaded in its own isolated, resource-limited
process (`contained.StudentProcess`; as an unprivileged user with `--run-as`), which serves the answers; the tests
run here, compute the expected values here and score here. The exit status is 0 whatever the score; it is 2
only when grading itself cannot run (a missing file, an unknown exercise id, nothing to grade), and then a
results.json asked for still says why.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import pwd
import sys
import tempfile
import time
from pathlib import Path

from llminfer.grading.contained import Limits, StudentProcess, become_subreaper
from llminfer.grading.exercise import Exercise, ExerciseResult
from llminfer.grading.gradescope import PACKAGE, results_json, write_autograder
from llminfer.grading.registry import all_exercises, get_exercise
from llminfer.grading.runner import grade_exercise
from llminfer.grading.student import FORBIDDEN_PACKAGE
from llminfer.grading.submission import SUFFIXES, code_cells, without_magics


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
    grade.add_argument("--load-timeout", type=float, metavar="S", default=Limits.load_seconds,
                       help="seconds allowed to load one submission file (default: %(default)g)")
    grade.add_argument("--memory-limit", type=float, metavar="GIB", default=Limits.memory_bytes / 2**30,
                       help="address space of a submission's process, in GiB (default: %(default)g)")
    grade.add_argument("--run-as", metavar="USER",
                       help="run student code as this unprivileged user (needs root; the Gradescope bundle does)")
    grade.add_argument("--make-autograder", type=Path, metavar="DIR",
                       help="write setup.sh and run_autograder for Gradescope into DIR, and grade nothing")
    grade.add_argument("--package", default=PACKAGE, help="what setup.sh pip-installs (pin a commit or version)")
    grade.add_argument("--list", action="store_true", help="list the exercises and exit")
    grade.set_defaults(run=run_grade)


def run_grade(args: argparse.Namespace) -> int:
    """List, write the autograder, or grade and report; 0 whatever the score."""
    start = time.perf_counter()
    try:
        return _run_grade(args, start)
    except (ValueError, OSError) as exc:   # grading cannot run: say why, also to Gradescope
        if getattr(args, "gradescope", None):
            write_results(args.gradescope, results_json([], time.perf_counter() - start,
                                                        f"grading could not run: {exc}"))
        raise


def _run_grade(args: argparse.Namespace, start: float) -> int:
    for name, unit in (("timeout", "seconds"), ("load_timeout", "seconds"), ("memory_limit", "GiB")):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 {unit}, got {value:g}")
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
    if args.run_as:
        try:
            pwd.getpwnam(args.run_as)
        except KeyError:
            raise ValueError(f"--run-as {args.run_as!r}: there is no such user") from None
        if os.geteuid() != 0:
            raise ValueError(f"--run-as {args.run_as} needs root (the grader switches to that user to run student "
                             "code)")
    files = submission_files(args.paths)
    if not args.run_as and hasattr(os, "geteuid"):   # say which containment this run cannot give
        print("llminfer grade: running as root without --run-as: student code runs as root too, and can write any "
              "file (scores are still decided here; pass --run-as USER to contain it)" if os.geteuid() == 0 else
              "llminfer grade: without --run-as, student code can write what you can, and the process-count limit "
              "does not apply (the kernel counts processes per user)", file=sys.stderr)
    become_subreaper()   # what a submission starts and detaches still ends up ours, to be stopped
    limits = Limits(memory_bytes=int(args.memory_limit * 2**30), load_seconds=args.load_timeout)
    results, notes = grade_files(files, exercises, args.timeout, limits, args.run_as)
    total, most = sum(r.score for r in results), sum(r.max_score for r in results)
    summary = "\n".join([*notes, f"score: {total:g} / {most:g}"])
    for result in results:
        print(result.table() + "\n")
    print(summary)
    if args.gradescope:
        write_results(args.gradescope, results_json(results, time.perf_counter() - start, summary))
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


def grade_files(files: list[Path], exercise_ids: list[str], timeout: float | None, limits: Limits | None = None,
                run_as: str | None = None) -> tuple[list[ExerciseResult], list[str]]:
    """Each exercise graded in the first file that defines its answer (0 points if none does), and notes.

    Each file is loaded in its own contained process (`StudentProcess`); the tests run here, against it."""
    graded: dict[str, ExerciseResult] = {}
    notes = []
    exercises = [get_exercise(i) for i in exercise_ids] or list(all_exercises().values())
    for path in files:
        # Only what the file names (a definition must), so that its process loads only what those need.
        text = path.read_bytes()
        wanted = [e for e in exercises if e.id not in graded and e.target.encode() in text]
        notes += [f"{path.name}: {line}" for line in flagged_imports(path, wanted)]
        process = StudentProcess(path, {e.target: e.mirrors for e in wanted}, limits or Limits(), run_as,
                                 tuple(sorted({w for e in wanted for w in e.warm})))
        try:
            process.start()
            notes += [f"{path.name}: {line}" for line in process.log]
            for exercise in wanted:
                if exercise.target in process.defined:
                    graded[exercise.id] = grade_exercise(exercise, None, timeout, process=process)
        finally:
            process.stop()
    wanted_ids = exercise_ids or [i for i in all_exercises() if i in graded]
    if not wanted_ids:
        names = ", ".join(e.target for e in all_exercises().values())
        raise ValueError(f"the submission defines none of the exercises' names ({names}); name them with --exercise")
    return [graded.get(i) or grade_exercise(get_exercise(i), None, timeout) for i in wanted_ids], notes


def flagged_imports(path: Path, exercises: list[Exercise]) -> list[str]:
    """A line for each import in the submission of the grader's references or of library code an exercise
    mirrors: refused or switched off while grading, and worth an instructor's look."""
    try:
        cells = code_cells(path)
    except Exception:  # unreadable: the student's process says why
        return []
    lines = []
    for source in cells:
        try:
            tree = ast.parse(without_magics(source))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in imported:
                line = _flag(module, name, exercises)
                if line and line not in lines:
                    lines.append(line)
    return lines


def _flag(module: str, name: str | None, exercises: list[Exercise]) -> str | None:
    what = f"{module}.{name}" if name else module
    home, qualname = module, name
    if name and (module == "llminfer" or module.startswith("llminfer.")):
        try:   # where the imported thing is defined (packages re-export names)
            value = getattr(importlib.import_module(module), name)
            home, qualname = ((value.__name__, None) if inspect.ismodule(value)
                              else (getattr(value, "__module__", module), getattr(value, "__qualname__", name)))
        except Exception:
            pass
    if any(m == FORBIDDEN_PACKAGE or m.startswith(FORBIDDEN_PACKAGE + ".") for m in (module, f"{module}.{name}")):
        return f"flagged: it imports {what}, the grader's reference answers (refused while grading)"
    for exercise in exercises:
        for mirror in exercise.mirrors:
            mirror_module, _, mirror_name = mirror.partition(":")
            inside = home == mirror_module or home.startswith(mirror_module + ".") or (
                not name and mirror_module.startswith(module + ".") and not mirror_name)
            if inside and (not mirror_name or (qualname or "").split(".")[0] == mirror_name):
                return (f"note: it imports {what}, llminfer's own version of what exercise {exercise.id!r} asks "
                        "for; that code is switched off while the exercise's tests run")
    return None


def write_results(path: Path, report: dict) -> None:
    """Write results.json atomically: a file beside it, then a rename, so a reader never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".results-", suffix=".json", delete=False,
                                     encoding="utf-8") as out:
        json.dump(report, out, indent=2)
    os.replace(out.name, path)
