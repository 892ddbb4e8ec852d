"""Grade one submission file in this process: `python -m llminfer.grading.worker FILE --out RESULT.json`.

`llminfer grade` runs this in a subprocess per file, so a submission that crashes or hangs while it
loads cannot take the grader down; each test then runs in its own forked child (see `sandbox`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from llminfer.grading.registry import all_exercises, get_exercise
from llminfer.grading.runner import grade_exercise
from llminfer.grading.submission import load_submission


def grade_file(path: Path, exercise_ids: list[str], timeout: float | None) -> dict:
    """Load `path` and grade the exercises it defines (of `exercise_ids`, or of all): a JSON-ready report."""
    namespace, log = load_submission(path)
    wanted = [get_exercise(i) for i in exercise_ids] if exercise_ids else list(all_exercises().values())
    results = [grade_exercise(e, namespace[e.target], timeout) for e in wanted if e.target in namespace]
    return {"log": log, "results": [asdict(result) for result in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--exercise", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    report = grade_file(args.path, args.exercise, args.timeout)
    args.out.write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
