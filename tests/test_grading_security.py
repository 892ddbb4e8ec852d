"""The grader against students who want marks without the work: every class of cheat in tests/grading_cheats,
graded by the real `llminfer grade`, scores only what a plain answer of the same values would; the grader
survives, writes a valid results.json and leaves nothing running. Also the wire itself, fuzzed, and the
Gradescope bundle script in a simulated /autograder layout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llminfer.grading import get_exercise, grade_exercise, wire
from llminfer.grading.gradescope import write_autograder

ROOT = Path(__file__).resolve().parents[1]
CHEATS = ROOT / "tests" / "grading_cheats"
SOLUTIONS = ROOT / "tests" / "grading_solutions"


def grade(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llminfer.cli", "grade", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def scores(results: Path) -> tuple[dict[str, float], dict[str, set[str]], dict]:
    """Per exercise: points, and the names of the tests that passed; and the whole results.json."""
    data = json.loads(results.read_text())
    points, passed = {}, {}
    for test in data["tests"]:
        exercise, name = test["name"].split(": ", 1)
        points[exercise] = points.get(exercise, 0) + test["score"]
        if test["status"] == "passed":
            passed.setdefault(exercise, set()).add(name)
    return points, passed, data


def passed_in_process(exercise_id: str, answer) -> set[str]:
    return {o.name for o in grade_exercise(get_exercise(exercise_id), answer).outcomes if o.passed}


# What each cheat's answer amounts to once the wire has copied it out as plain data: a plain answer giving the
# same values. A cheat may earn what that plain answer earns (a 0 is right where the answer is 0), no more.
def _zero(*args, **kwargs):
    return 0


PLAIN = {
    "top_p": lambda logits, p: torch.zeros_like(logits),   # the copy is refused: its fallback remains
    "decode_bytes": _zero,
    "sequences_that_fit": _zero,
    "prefix_hash": lambda token_ids, block_size: [],
    "schedule_step": lambda running, waiting, budget, max_num_seqs: {},
    "spec_verify": lambda drafts, q, p, generator: [0],
    "ngram_lookup": lambda token_ids, min_n, max_n, k: [],
}
CHEATED = ["top_p", "min_p", "rope", "paged_decode_kernel", "causal_mask", "attention", "int4_unpack_dequantize",
           "sse_parse", *PLAIN]


def test_every_class_of_cheat_scores_only_what_its_plain_values_earn(tmp_path):
    submission = tmp_path / "submission"
    shutil.copytree(CHEATS, submission)
    (submission / "README.md").unlink()
    results = tmp_path / "results" / "results.json"
    forge = submission / "e_forge_reports.py"
    forge.write_text(forge.read_text().replace("RESULTS_JSON", str(results)))
    result = grade(str(submission), *[arg for e in CHEATED for arg in ("--exercise", e)], "--gradescope",
                   str(results))
    assert result.returncode == 0, result.stderr
    points, passed, data = scores(results)
    assert set(points) == set(CHEATED)
    for exercise in CHEATED:
        if exercise in PLAIN:
            assert passed.get(exercise, set()) <= passed_in_process(exercise, PLAIN[exercise]), (exercise, passed)
        else:
            assert points[exercise] == 0, (exercise, passed.get(exercise))
    assert data["score"] == sum(points.values()) < 15
    output = data["output"]
    # Imports of the references are flagged; library functions an exercise mirrors are noted, and switched off.
    assert "it imports llminfer.grading.exercises.sampling.apply_top_p, the grader's reference answers" in output
    assert "it imports llminfer.sampling.apply_min_p, llminfer's own version of what exercise 'min_p'" in output
    assert "llminfer.kernels.paged_attention_decode_reference" in output
    # Limits: the memory hog and the big file fail with the system's own error, and the rest of the file grades.
    assert "DefaultCPUAllocator: can't allocate memory" in output or "MemoryError" in output
    assert "File too large" in output
    # Files beside the submission never shadow the grader's own modules.
    assert not list(submission.rglob("SHADOWED*"))
    messages = {t["name"]: t["output"] for t in data["tests"]}
    assert any("the answer calls llminfer's llminfer.models.llama" in m for m in messages.values())
    assert any("the answer calls llminfer's llminfer.kernels" in m for m in messages.values())


DAEMON = '''
"""Start a detached process (double fork, new session) that rewrites results.json after the grader exits, and
50 more that just stay."""
import os, subprocess, sys, time

RESULTS, MARKER = {results!r}, {marker!r}
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:   # wait for the grader to write its results, then overwrite them
        for _ in range(600):
            if os.path.exists(RESULTS):
                break
            time.sleep(0.1)
        time.sleep(1)
        with open(RESULTS, "w") as f:
            f.write('{{"score": 1000, "tests": []}}')
        with open(MARKER, "w") as f:
            f.write("still running")
    os._exit(0)
os.waitpid(pid, 0)
for _ in range(50):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30); open({marker!r} + '.50', 'w')"],
                     start_new_session=True)


class IncrementalDetokenizer:   # wrong: sends nothing
    def __init__(self, tokenizer, stop=(), min_tokens=0):
        pass

    def update(self, token_ids):
        return ""

    def finish(self, final_text):
        return ""
'''


def test_processes_a_submission_starts_do_not_outlive_grading_nor_rewrite_results(tmp_path):
    results, marker = tmp_path / "results.json", tmp_path / "daemon-was-here"
    (tmp_path / "daemon.py").write_text(DAEMON.format(results=str(results), marker=str(marker)))
    result = grade(str(tmp_path / "daemon.py"), "--gradescope", str(results))
    assert result.returncode == 0, result.stderr
    written = results.read_text()
    assert json.loads(written)["score"] == 0
    time.sleep(3)
    assert results.read_text() == written
    assert not marker.exists() and not Path(str(marker) + ".50").exists()
    alive = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True).stdout.split()
    for pid in alive:   # (cleanup if the test fails)
        os.kill(int(pid), signal.SIGKILL)
    assert alive == []


def test_a_load_that_swallows_its_time_limit_is_stopped_by_the_grader(tmp_path):
    (tmp_path / "loop.py").write_text(
        "import time\n\ndef apply_top_p(logits, p):\n    return logits\n\n"
        "while True:\n    try:\n        time.sleep(100)\n    except BaseException:\n        pass\n")
    start = time.monotonic()
    result = grade(str(tmp_path / "loop.py"), "--exercise", "top_p", "--timeout", "1", "--load-timeout", "5")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    assert "loading it took more than 5 s; it was stopped" in result.stdout
    assert "score: 0 / 10" in result.stdout


def test_bad_files_get_a_message_each_and_a_fenced_block_in_prose_does_not_run(tmp_path):
    (tmp_path / "syntax.py").write_text("def apply_top_p(:\n")
    (tmp_path / "broken.ipynb").write_text("{not json")
    (tmp_path / "latin1.py").write_bytes(b"x = '\xff\xfe'\n")
    (tmp_path / "notes.txt").write_text("not a submission")
    marker = tmp_path / "FENCED_RAN"
    (tmp_path / "prose.md").write_text(
        "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n---\n\n"
        f"# Prose\n\n```python\nopen({str(marker)!r}, 'w').write('ran')\n```\n\n"
        "```{code-cell} ipython3\nmin_p_seen = True\n```\n")
    results = tmp_path / "out" / "results.json"
    result = grade(str(tmp_path), "--exercise", "top_p", "--gradescope", str(results))
    assert result.returncode == 0, result.stderr
    assert "syntax.py: the module raised SyntaxError at line 1" in result.stdout
    assert "broken.ipynb: could not be loaded: JSONDecodeError" in result.stdout
    assert "latin1.py: could not be loaded: UnicodeDecodeError" in result.stdout
    assert "notes.txt" not in result.stdout
    assert not marker.exists()
    assert json.loads(results.read_text())["score"] == 0


def test_nothing_to_grade_exits_2_and_still_writes_results(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    results = tmp_path / "results.json"
    result = grade(str(empty), "--gradescope", str(results))
    assert result.returncode == 2 and "defines none of the exercises' names" in result.stderr
    data = json.loads(results.read_text())
    assert data["score"] == 0 and "grading could not run" in data["output"]
    result = grade(str(empty), "--exercise", "top_p", "--gradescope", str(results))   # named: 0 points, a reason
    assert result.returncode == 0
    assert "no function or class named 'apply_top_p'" in json.loads(results.read_text())["tests"][0]["output"]
    result = grade(str(tmp_path / "missing.py"))
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def test_honest_answers_score_full_marks_through_the_real_cli(tmp_path):
    """The instructors' answer keys, every exercise, one folder: full marks, nothing flagged."""
    results = tmp_path / "results.json"
    result = grade(str(SOLUTIONS), "--gradescope", str(results))
    assert result.returncode == 0, result.stderr
    points, _, data = scores(results)
    assert data["score"] == sum(e.max_score for e in map(get_exercise, points)) == 225
    assert "flagged" not in data["output"] and "note:" not in data["output"], data["output"]


# --- the wire ----------------------------------------------------------------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def roundtrip(value: object, extra=None) -> object:
    read, write = os.pipe()
    try:
        wire.send(write, {"value": value}, extra=extra)
        return wire.receive(read, time.monotonic() + 5)["value"]
    finally:
        os.close(read)
        os.close(write)


@settings(max_examples=150, deadline=None)
@given(plain)
def test_plain_data_crosses_the_wire_unchanged_with_exact_types(value):
    back = roundtrip(value)
    assert back == value

    def exact(a, b):
        assert type(a) is type(b)
        if isinstance(a, (list, tuple)):
            for x, y in zip(a, b, strict=True):
                exact(x, y)
        if isinstance(a, dict):
            for (k1, v1), (k2, v2) in zip(a.items(), b.items(), strict=True):
                exact(k1, k2)
                exact(v1, v2)

    exact(value, back)


@pytest.mark.parametrize("dtype", sorted(wire.DTYPES.values(), key=str), ids=str)
def test_tensors_cross_the_wire_exactly_and_subclasses_come_back_plain(dtype):
    class Liar(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "equal":
                return True
            return super().__torch_function__(func, types, args, kwargs or {})

    x = (torch.randn(3, 0 if dtype == torch.bool else 5) * 10).to(dtype)
    for value in (x, x.t(), torch.zeros(2, 3, dtype=dtype).as_subclass(Liar), x[..., :0], torch.tensor(1, dtype=dtype)):
        back = roundtrip(value)
        assert type(back) is torch.Tensor and back.dtype == dtype and back.shape == value.shape
        assert torch.equal(back, torch.Tensor.as_subclass(value, torch.Tensor))
    assert roundtrip(dtype) is dtype


def test_values_that_lie_are_copied_out_as_what_they_claim():
    class EqualInt(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class EqualDict(dict):
        def __eq__(self, other):
            return True

    back = roundtrip([EqualInt(3), EqualDict(a=1), (1, 2)])
    assert back == [3, {"a": 1}, (1, 2)] and type(back[0]) is int and type(back[1]) is dict
    assert back[0] != 4
    with pytest.raises(wire.WireError, match="cannot be graded"):
        roundtrip(object())
    with pytest.raises(wire.WireError, match="nested more than"):
        nested = []
        for _ in range(200):
            nested = [nested]
        roundtrip(nested)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_from_the_student_side_decode_or_fail_with_a_wire_error(data):
    read, write = os.pipe()
    try:
        os.write(write, data)
        os.close(write)
        write = None
        try:
            message = wire.receive(read, time.monotonic() + 2)
        except (wire.WireError, wire.Closed):
            return
        assert type(message) is dict
    finally:
        os.close(read)
        if write is not None:
            os.close(write)


def test_a_header_or_blob_over_the_limit_is_refused_before_it_is_read():
    read, write = os.pipe()
    try:
        os.write(write, (wire.MAX_HEADER + 1).to_bytes(8, "little"))
        with pytest.raises(wire.WireError, match="header of"):
            wire.receive(read, time.monotonic() + 2)
        header = json.dumps({"message": {}, "blobs": [wire.MAX_BLOBS + 1]}).encode()
        os.write(write, len(header).to_bytes(8, "little") + header)
        with pytest.raises(wire.WireError, match="blobs of"):
            wire.receive(read, time.monotonic() + 2)
    finally:
        os.close(read)
        os.close(write)


# --- the Gradescope bundle ---------------------------------------------------------------------------------------

def autograder(tmp_path: Path, student: str | None, *files: tuple[str, str]) -> tuple[Path, Path]:
    """A simulated /autograder: the bundle's run_autograder (made by the real --make-autograder code), pointing
    at this interpreter, with the submission's files."""
    root = tmp_path / "autograder"
    (root / "submission").mkdir(parents=True)
    for name, text in files:
        (root / "submission" / name).write_text(text)
    write_autograder(root / "source", ["top_p", "min_p"], None, root=str(root),
                     command=f"{sys.executable} -m llminfer.cli", student=student)
    return root, root / "source" / "run_autograder"


def test_the_bundle_script_grades_in_a_simulated_autograder_layout(tmp_path):
    honest = (SOLUTIONS / "top_p.py").read_text()
    cheat = "from llminfer.grading import get_exercise\n\napply_min_p = get_exercise('min_p').reference\n"
    root, script = autograder(tmp_path, None, ("answer.py", honest), ("cheat.py", cheat))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    points, _, data = scores(root / "results" / "results.json")
    assert points == {"top_p": 10, "min_p": 0}, data["output"]


def _can_run_as(user: str) -> bool:
    try:
        return subprocess.run([sys.executable, "-I", "-c", "import llminfer.grading.student"], user=user,
                              capture_output=True, timeout=120, cwd="/").returncode == 0
    except (OSError, KeyError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not _can_run_as("nobody"),
                    reason="needs root, and an interpreter the user 'nobody' can run (here it lives under /root)")
def test_the_bundle_runs_student_code_as_an_unprivileged_user(tmp_path):
    tmp_path.chmod(0o755)
    cheat = ("import os, pathlib\n"
             "here = pathlib.Path('/proc/self/status').read_text()\n"
             "uid = [l for l in here.splitlines() if l.startswith('Uid:')][0]\n"
             "try:\n    open(os.path.join({results!r}, 'results.json'), 'w').write('{{}}')\n    wrote = True\n"
             "except OSError:\n    wrote = False\n"
             "def apply_min_p(logits, p):\n    raise RuntimeError(f'{{uid}} wrote={{wrote}}')\n")
    root, script = autograder(tmp_path, "nobody", ("answer.py", (SOLUTIONS / "top_p.py").read_text()))
    (root / "submission" / "cheat.py").write_text(cheat.format(results=str(root / "results")))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    points, _, data = scores(root / "results" / "results.json")
    assert points == {"top_p": 10, "min_p": 0}
    said = [t["output"] for t in data["tests"] if t["name"].startswith("min_p")][0]
    assert "wrote=False" in said and "Uid: 65534" in said
