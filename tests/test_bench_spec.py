"""`llminfer bench spec`: the formula's pieces against closed forms and a simulation, a small real sweep whose
rows add up, and arguments it cannot run refused before anything loads."""

import random
import subprocess
import sys

import pytest

from llminfer.bench import spec as bench
from llminfer.spec.metrics import SpecStats


@pytest.mark.parametrize("a, k", [(0.0, 3), (0.5, 1), (0.5, 4), (0.8, 8), (1.0, 5)])
def test_expected_tokens_matches_a_simulation_of_independent_acceptance(a, k):
    rng = random.Random(0)
    trials = 40_000

    def one_verification() -> int:
        kept = 0
        while kept < k and rng.random() < a:
            kept += 1
        return kept + 1   # the kept drafts and the verifier's own token

    mean = sum(one_verification() for _ in range(trials)) / trials
    assert bench.expected_tokens(a, k) == pytest.approx(mean, abs=0.03)
    assert bench.expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))


def test_alpha_is_kept_over_checked_drafts():
    stats = SpecStats()
    for drafted, accepted in [(4, 4), (4, 0), (4, 2), (2, 1)]:
        stats.record(drafted, accepted)
    # checked: 4 + 1 + 3 + 2 tokens (a token is checked when all before it were kept); kept: 4 + 0 + 2 + 1
    assert bench.alpha(stats) == pytest.approx(7 / 10)
    assert bench.alpha(SpecStats()) is None


def test_a_small_sweep_runs_and_its_rows_add_up():
    result = bench.run(batch_sizes=(1, 2), ks=(2,), ks_batched=(3,), workloads=("open",), output_len=12, repeats=1,
                       log=lambda line: None)
    rows = result["rows"]
    assert [(r["batch_size"], r["proposer"], r["k"]) for r in rows] == [
        (1, "ngram", 2), (1, "draft_model", 2), (2, "ngram", 3), (2, "draft_model", 3)]
    for r in rows:
        assert r["identical_requests"] == r["requests"] == r["batch_size"]
        assert r["speedup"] == pytest.approx(r["base_seconds"] / r["spec_seconds"])
        assert 0 <= r["coverage"] <= 1 and 0 <= r["alpha"] <= 1
        assert r["tokens_per_request_step"]["base"] == pytest.approx(12 * r["batch_size"] / (11 * r["batch_size"]))
        assert r["tokens_per_request_step"]["spec"] >= r["tokens_per_request_step"]["base"]
        assert r["predicted_speedup_with_measured_costs"] == pytest.approx(
            r["tokens_per_request_step"]["formula_with_coverage"] / r["step_cost_over_base"])
        assert len(r["acceptance_by_position"]) <= r["k"]
    draft_rows = [r for r in rows if r["proposer"] == "draft_model"]
    assert all(r["coverage"] > 0.8 for r in draft_rows)   # a draft model drafts at (nearly) every step


@pytest.mark.parametrize("change, named", [
    ({"batch_sizes": ()}, "batch_sizes must be a non-empty list"),
    ({"batch_sizes": (0,)}, "batch_sizes must be a non-empty list of positive ints, got (0,)"),
    ({"batch_sizes": (10**9,)}, "batch sizes above 1024"),
    ({"ks": (True,)}, "ks must be"),
    ({"ks_batched": (2.5,)}, "ks_batched must be"),
    ({"workloads": ("grounded", "poetry")}, "workloads must be among grounded, open, got ('grounded', 'poetry')"),
    ({"proposers": ("eagle",)}, "proposers must be among ngram, draft_model, got ('eagle',)"),
    ({"proposers": "ngram"}, "proposers must be among"),
    ({"output_len": 0}, "output_len must be a positive int, got 0"),
    ({"repeats": -1}, "repeats must be a positive int, got -1"),
])
def test_arguments_the_sweep_cannot_run_are_refused_naming_them(change, named):
    arguments = {"batch_sizes": (1,), "ks": (2,), "ks_batched": (2,), "workloads": ("open",),
                 "proposers": ("ngram",), "output_len": 8, "repeats": 1} | change
    with pytest.raises(ValueError) as info:
        bench.check_arguments(**arguments)
    assert named in str(info.value)


@pytest.mark.parametrize("args, named", [
    (["--proposers", "ngram,medusa"], "proposers must be among"),
    (["--k", "1,x"], "--k takes comma-separated integers, got '1,x'"),
    (["--repeats", "0"], "repeats must be a positive int, got 0"),
])
def test_the_cli_refuses_bad_sweeps_in_one_line(args, named):
    result = subprocess.run([sys.executable, "-m", "llminfer.cli", "bench", "spec", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
