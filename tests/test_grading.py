"""The grader: each exercise's reference earns full marks, its stub nothing, and every plausible wrong
answer kept in `grading_wrong` less than full marks; hostile code costs one test each; `llminfer grade`
writes a valid Gradescope results.json for a notebook and for a module."""

import ctypes
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch
import triton
from grading_wrong import WRONG

from llminfer.cli import main
from llminfer.grading import Exercise, ExerciseTest, Mismatch, all_exercises, check, get_exercise, grade_exercise
from llminfer.grading.exercises import paged_kv
from llminfer.grading.submission import load_submission

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = list(all_exercises().values())
NOTEBOOKS = sorted((ROOT / "exercises").rglob("[0-9]*.md"))


def stub(*args, **kwargs):
    raise NotImplementedError


@triton.jit
def kernel_stub(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
                stride_block, stride_slot, stride_head, GROUP, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N):
    raise NotImplementedError


@triton.jit
def gemv_kernel_stub(x, packed, scales, zeros, out, out_features, in_features, GROUP_SIZE, BLOCK_N, BLOCK_K):
    raise NotImplementedError


STUBS = {"paged_decode_kernel": kernel_stub, "int4_gemv_triton": gemv_kernel_stub}   # a kernel's stub is a kernel


def notebook_of(exercise) -> Path:
    return ROOT / "exercises" / Path(exercise.chapter).relative_to("chapters").with_suffix(".md")


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_the_reference_earns_full_marks(exercise):
    result = grade_exercise(exercise, exercise.reference)
    assert result.score == result.max_score == exercise.max_score, result.table()


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_a_stub_earns_nothing(exercise):
    result = grade_exercise(exercise, STUBS.get(exercise.id, stub))
    assert result.score == 0
    assert all("NotImplementedError" in outcome.message for outcome in result.outcomes)


@pytest.mark.parametrize("exercise_id, name", [(e, name) for e, wrongs in WRONG.items() for name in wrongs],
                         ids=lambda value: value.replace(" ", "_"))
def test_a_wrong_answer_earns_less_than_full_marks(exercise_id, name):
    result = grade_exercise(get_exercise(exercise_id), WRONG[exercise_id][name])
    assert result.score < result.max_score, f"{name!r} passed every test of {exercise_id}"
    assert all(outcome.message for outcome in result.outcomes if not outcome.passed)


def test_every_exercise_keeps_three_wrong_answers_and_has_a_notebook():
    assert set(WRONG) <= set(all_exercises())
    for exercise in EXERCISES:
        assert len(WRONG.get(exercise.id, {})) >= 3, exercise.id
        assert (ROOT / f"{exercise.chapter}.md").is_file(), exercise.chapter
        text = notebook_of(exercise).read_text()
        assert f'check("{exercise.id}")' in text and f"{{doc}}`/{exercise.chapter}`" in text
        assert f"def {exercise.target}(" in text or f"class {exercise.target}:" in text \
            or f"class {exercise.target}(" in text


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_an_exercise_notebook_as_shipped_loads_and_scores_nothing(notebook):
    namespace, log = load_submission(notebook)
    assert log == []
    graded = [e for e in EXERCISES if notebook_of(e) == notebook]
    assert graded
    for exercise in graded:
        result = grade_exercise(exercise, namespace[exercise.target])
        assert result.score == 0
        assert all("NotImplementedError" in outcome.message for outcome in result.outcomes), result.table()


@pytest.mark.parametrize("exercise_id, name", [
    ("int4_quantize_pack", "calls llminfer.quant's quantize_int4 and pack_int4"),
    ("int4_unpack_dequantize", "calls llminfer.quant's Int4Weight.dequantize"),
    ("gptq_block_update", "right, but rounds with llminfer.quant's int4_codes"),
])
def test_an_answer_that_calls_llminfers_quantization_code_earns_nothing_and_is_told_why(exercise_id, name):
    # The wrong answers imported llminfer's functions before grading: the grader switches off the functions
    # themselves, not the names under which they were imported.
    result = grade_exercise(get_exercise(exercise_id), WRONG[exercise_id][name])
    assert result.score == 0
    assert all("the answer calls llminfer's llminfer.quant.formats." in o.message for o in result.outcomes), \
        result.table()


def hostile_mask(num_queries, num_keys):
    """Right on the square mask after printing 10 MB; exits on decode, hangs on the chunk, segfaults on 1x1."""
    if (num_queries, num_keys) == (1, 7):
        os._exit(1)
    if (num_queries, num_keys) == (3, 8):
        while True:
            pass
    if (num_queries, num_keys) == (1, 1):
        ctypes.string_at(0)
    print("x" * 10_000_000)
    return torch.ones(num_queries, num_keys, dtype=torch.bool).tril(num_keys - num_queries)


def test_loops_crashes_and_floods_each_cost_one_test_and_the_rest_runs():
    result = grade_exercise(get_exercise("causal_mask"), hostile_mask, timeout=2.0)
    square, decode, chunk, one = result.outcomes
    assert square.passed and "it printed 10,000,001 characters" in square.message
    assert square.printed == "x" * 1000
    assert not decode.passed and "exited with status 1" in decode.message
    assert not chunk.passed and "timed out after 2 s" in chunk.message
    assert not one.passed and "SIGSEGV" in one.message
    assert result.score == 1


def test_a_wrong_type_or_an_exception_is_named():
    result = grade_exercise(get_exercise("top_p"), WRONG["top_p"]["returns a list"])
    assert "is a list, expected a torch.Tensor of shape [5, 123]" in result.outcomes[0].message

    def raises(logits, p):
        return logits[10**6]

    message = grade_exercise(get_exercise("top_p"), raises).outcomes[0].message
    assert message.startswith("raised IndexError") and "(in raises, line" in message


def test_setup_runs_once_in_the_grading_process_and_a_failing_one_fails_every_test():
    loaded = []

    def sees_one_load(answer):
        if loaded != ["model"]:   # the forked test sees what setup loaded in the parent, loaded once
            raise Mismatch(f"setup loaded {loaded}")
        return "ok"

    tests = (ExerciseTest("first", 1, sees_one_load), ExerciseTest("second", 1, sees_one_load))
    exercise = Exercise("with_setup", "t", "chapters/basics/01_prompt_to_text", "f", stub, tests,
                        setup=lambda: loaded.append("model"))
    assert grade_exercise(exercise, stub).score == 2
    broken = Exercise("broken_setup", "t", "chapters/basics/01_prompt_to_text", "f", stub, tests,
                      setup=lambda: 1 / 0)
    result = grade_exercise(broken, stub)
    assert result.score == 0
    assert all("could not prepare this exercise: ZeroDivisionError" in o.message for o in result.outcomes)


def test_check_finds_the_callers_definition_and_never_raises(capsys):
    namespace = {"check": check}
    exec("import torch\ndef causal_mask(q, k):\n    return torch.ones(q, k, dtype=torch.bool).tril(k - q)\n"
         "result = check('causal_mask')", namespace)
    assert namespace["result"].score == 5
    assert "PASS" in capsys.readouterr().out
    assert check("causal_mask").score == 0          # nothing named causal_mask here
    assert "no function or class named 'causal_mask'" in capsys.readouterr().out
    assert check("no_such_exercise") is None
    assert "unknown exercise 'no_such_exercise'" in capsys.readouterr().out


def assert_gradescope_results(path: Path) -> dict:
    """Gradescope's results.json schema, with the scores adding up."""
    data = json.loads(path.read_text())
    assert {"score", "execution_time", "output", "tests"} <= set(data)
    assert isinstance(data["output"], str) and data["execution_time"] >= 0
    names = [test["name"] for test in data["tests"]]
    assert len(set(names)) == len(names) > 0
    for test in data["tests"]:
        assert set(test) == {"name", "score", "max_score", "status", "output", "visibility"}
        assert test["status"] in ("passed", "failed") and isinstance(test["output"], str)
        assert test["visibility"] in ("visible", "hidden", "after_due_date", "after_published")
        assert 0 <= test["score"] <= test["max_score"]
        assert (test["status"] == "passed") == (test["score"] == test["max_score"])
    assert data["score"] == pytest.approx(sum(test["score"] for test in data["tests"]))
    return data


def solution(exercise_id: str) -> str:
    """The instructors' answer key of an exercise (tests/grading_solutions), as source text."""
    text = (ROOT / "tests" / "grading_solutions" / f"{exercise_id}.py").read_text()
    return text.replace("from __future__ import annotations\n", "")   # so that keys can be joined in one cell


def grade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llminfer.cli", "grade", *args], capture_output=True, text=True,
                          timeout=300)


def test_grade_gives_a_solved_notebook_full_marks(tmp_path):
    notebook = jupytext.read(ROOT / "exercises/basics/01_prompt_to_text.md")
    notebook.cells.append(nbformat.v4.new_code_cell(
        solution("top_p") + "\n" + solution("min_p") + "\n!pip install nothing\n%time checked = True"))
    jupytext.write(notebook, tmp_path / "solved.ipynb")
    result = grade(str(tmp_path / "solved.ipynb"), "--gradescope", str(tmp_path / "results.json"))
    assert result.returncode == 0, result.stderr
    data = assert_gradescope_results(tmp_path / "results.json")
    assert data["score"] == 20 and "score: 20 / 20" in result.stdout
    assert {test["name"].split(":")[0] for test in data["tests"]} == {"top_p", "min_p"}


def test_grade_a_folder_of_modules_one_of_which_crashes(tmp_path):
    (tmp_path / "answers.py").write_text(
        solution("rope") + "\n\n"
        "def causal_mask(num_queries, num_keys):  # aligned to the first key: wrong unless square\n"
        "    return torch.ones(num_queries, num_keys, dtype=torch.bool).tril()\n")
    (tmp_path / "broken.py").write_text("import os\nprint('x' * 10**6)\nos._exit(3)\n")
    out = tmp_path / "results" / "results.json"
    result = grade(str(tmp_path), "--exercise", "rope", "--exercise", "causal_mask", "--exercise", "attention",
                   "--timeout", "5", "--gradescope", str(out))
    assert result.returncode == 0, result.stderr
    data = assert_gradescope_results(out)
    by_exercise = {}
    for test in data["tests"]:
        by_exercise.setdefault(test["name"].split(":")[0], []).append(test)
    assert all(t["status"] == "passed" for t in by_exercise["rope"])
    assert 0 < sum(t["score"] for t in by_exercise["causal_mask"]) < 5
    assert all("no function or class named 'attention'" in t["output"] for t in by_exercise["attention"])
    assert "broken.py: loading it ended the grading process" in data["output"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel is compiled, not interpreted")
def test_grade_runs_a_submitted_triton_kernel_in_the_interpreter_without_a_gpu(tmp_path):
    # The submission defines the kernel itself; `llminfer grade` must give its worker TRITON_INTERPRET=1 before
    # the module is loaded, even when the caller's environment does not have it.
    source = inspect.getsource(paged_kv._reference_kernel).replace("def _reference_kernel", "def paged_decode_kernel")
    (tmp_path / "kernel.py").write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + source)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "llminfer.cli", "grade", str(tmp_path / "kernel.py")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "score: 11 / 11" in result.stdout, result.stdout


def test_make_autograder_writes_gradescopes_two_files(tmp_path, capsys):
    assert main(["grade", "--make-autograder", str(tmp_path), "--exercise", "rope", "--timeout", "20"]) == 0
    setup, run = tmp_path / "setup.sh", tmp_path / "run_autograder"
    assert os.access(setup, os.X_OK) and os.access(run, os.X_OK)
    assert "pip install" in setup.read_text() and "llminfer" in setup.read_text()
    command = run.read_text()
    assert "grade /autograder/submission --exercise rope --timeout 20" in command
    assert "--gradescope /autograder/results/results.json" in command
    for script in (setup, run):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
