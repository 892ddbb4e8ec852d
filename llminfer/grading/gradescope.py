"""Gradescope's side: the `results.json` an autograder writes, and the two files an instructor uploads.

Gradescope runs `setup.sh` once to build the autograder's image and `run_autograder` for every
submission, which must leave its scores in `/autograder/results/results.json`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llminfer.grading.exercise import ExerciseResult

PACKAGE = "llminfer @ git+https://github.com/llminfer/llminfer"
VENV = "/autograder/llminfer-venv"


def results_json(results: list[ExerciseResult], execution_time: float, output: str) -> dict:
    """Gradescope's results.json: the total, and one entry per test with its score and why."""
    tests = []
    for result in results:
        for outcome in result.outcomes:
            text = outcome.message + (f"\n\nYour code printed:\n{outcome.printed}" if outcome.printed else "")
            tests.append({
                "name": f"{result.exercise_id}: {outcome.name}",
                "score": outcome.points,
                "max_score": outcome.max_points,
                "status": "passed" if outcome.passed else "failed",
                "output": text,
                "visibility": "visible" if outcome.visible else "after_published",
            })
    return {"score": sum(test["score"] for test in tests), "execution_time": round(execution_time, 2),
            "output": output, "tests": tests}


SETUP_SH = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, to build the autograder's image (made by `llminfer grade --make-autograder`).
set -euo pipefail
apt-get update -q
apt-get install -y -q python3 python3-venv python3-pip git
python3 -m venv {venv}
{venv}/bin/pip install -q --index-url https://download.pytorch.org/whl/cpu torch
{venv}/bin/pip install -q jupytext {package}
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope runs this for every submission: grade what the student uploaded, write the results.
# (Made by `llminfer grade --make-autograder`.) Each test runs in its own process with a time limit.
mkdir -p /autograder/results
{venv}/bin/llminfer grade /autograder/submission {options} \\
    --gradescope /autograder/results/results.json
"""


def write_autograder(directory: Path, exercise_ids: list[str], timeout: float | None = None,
                     package: str = PACKAGE) -> list[Path]:
    """Write `setup.sh` and `run_autograder` into `directory` (zip the two to upload them); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    options = " ".join([f"--exercise {shlex.quote(i)}" for i in exercise_ids]
                       + ([f"--timeout {timeout:g}"] if timeout else []))
    files = {
        directory / "setup.sh": SETUP_SH.format(venv=VENV, package=shlex.quote(package)),
        directory / "run_autograder": RUN_AUTOGRADER.format(venv=VENV, options=options),
    }
    for path, text in files.items():
        path.write_text(text, encoding="utf-8", newline="\n")
        path.chmod(0o755)
    return list(files)
