"""Gradescope's side: the `results.json` an autograder writes, and the two files an instructor uploads.

Gradescope runs `setup.sh` once to build the autograder's image and `run_autograder` for every
submission, which must leave its scores in `/autograder/results/results.json`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llminfer.grading.exercise import ExerciseResult

PACKAGE = "llminfer @ git+https://github.com/llminfer/llminfer"
ROOT = "/autograder"
VENV = f"{ROOT}/llminfer-venv"
STUDENT = "student"   # the unprivileged user student code runs as


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
# Student code runs as this user: it can read the grader's files, and write none of them.
id -u {student} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {student}
chmod -R go-w {venv}
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope runs this for every submission, as root: grade what the student uploaded, write the results.
# (Made by `llminfer grade --make-autograder`.) Student code runs as the user {student}, in a fresh folder,
# with resource limits; the tests and the scores stay in this root process. Only root can write the results.
set -u
mkdir -p {root}/results
chmod 755 {root}/results
{command} grade {root}/submission {options}{run_as} \\
    --gradescope {root}/results/results.json
"""


def write_autograder(directory: Path, exercise_ids: list[str], timeout: float | None = None,
                     package: str = PACKAGE, root: str = ROOT, command: str | None = None,
                     student: str | None = STUDENT) -> list[Path]:
    """Write `setup.sh` and `run_autograder` into `directory` (zip the two to upload them); return their paths.

    `root`, `command` (how to run llminfer) and `student` (None: do not switch users) are Gradescope's unless a
    test simulates its layout elsewhere."""
    directory.mkdir(parents=True, exist_ok=True)
    options = " ".join([f"--exercise {shlex.quote(i)}" for i in exercise_ids]
                       + ([f"--timeout {timeout:g}"] if timeout else []))
    command = command or f"{VENV}/bin/llminfer"
    files = {
        directory / "setup.sh": SETUP_SH.format(venv=VENV, package=shlex.quote(package),
                                                student=student or STUDENT),
        directory / "run_autograder": RUN_AUTOGRADER.format(
            root=shlex.quote(root), command=command, options=options, student=student or "root",
            run_as=f" --run-as {shlex.quote(student)}" if student else ""),
    }
    for path, text in files.items():
        path.write_text(text, encoding="utf-8", newline="\n")
        path.chmod(0o755)
    return list(files)
