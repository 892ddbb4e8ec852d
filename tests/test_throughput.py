"""The throughput benchmark's machinery on a tiny random model: same requests, agreeing outputs, a ratio
only when both engines produced as many tokens per request, and busy cores beside it on request."""

import json
import os
import time
from pathlib import Path

import pytest

from llminfer.bench.busy import busy_cores
from llminfer.bench.throughput import (
    Request,
    agreement,
    parse_range,
    random_requests,
    run,
    speedup_text,
    summarize,
)
from llminfer.cli import main
from llminfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from llminfer.models.registry import resolve_model_path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMINFER_CACHE", str(tmp_path))


def test_ranges_and_requests_are_validated_and_seeded():
    assert parse_range("16:256") == (16, 256) and parse_range("7") == (7, 7)
    for bad in ("0:5", "9:3", "a:b"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_range(bad)
    first, again = random_requests(100, 5, (2, 9), (1, 4), seed=3), random_requests(100, 5, (2, 9), (1, 4), seed=3)
    assert first == again and all(2 <= len(r.prompt_token_ids) <= 9 and 1 <= r.output_len <= 4 for r in first)


def test_agreement_counts_the_matching_prefix():
    result = agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    assert result["requests_identical"] == 1 and result["tokens_before_first_difference"] == 4
    assert result["token_agreement"] == pytest.approx(4 / 5)


def test_both_engines_run_the_same_requests_and_agree():
    result = run("llama-tiny-random", num_prompts=6, input_len=(3, 20), output_len=(2, 9), seed=0, max_num_seqs=4)
    requests = random_requests(2048, 6, (3, 20), (2, 9), seed=0)
    requested = sum(r.output_len for r in requests)
    assert result["requested_output_tokens"] == requested
    for engine in ("llminfer", "transformers"):
        assert result[engine]["output_tokens"] == requested
        assert result[engine]["output_tokens_per_s"] == pytest.approx(requested / result[engine]["seconds"])
    assert result["failed_requests"] == result["length_mismatches"] == 0 and result["busy_cores"] == 0
    assert result["outputs_agree"]["token_agreement"] > 0.95
    assert result["speedup"] == pytest.approx(result["transformers"]["seconds"] / result["llminfer"]["seconds"])


def finished(token_ids: list[int], finish_reason: str = "length", error: str | None = None) -> RequestOutput:
    """A finished llminfer output, as the engine returns it, with these tokens."""
    completion = CompletionOutput(index=0, text="", token_ids=token_ids, cumulative_logprob=None, logprobs=None,
                                  finish_reason=finish_reason)
    return RequestOutput(request_id="0", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=[completion], finished=True, new_token_ids=[], num_cached_tokens=0,
                         metrics=RequestMetrics(0.0, None, None, None), error=error)


def test_summary_counts_the_tokens_each_engine_produced():
    requests = [Request([1], 3), Request([2], 2)]
    summary = summarize(requests, [finished([5, 6, 7]), finished([8, 9])], [[5, 6, 7], [8, 0]], 0.5, 2.0)
    assert summary["llminfer"]["output_tokens"] == summary["transformers"]["output_tokens"] == 5
    assert summary["llminfer"]["output_tokens_per_s"] == 10.0 and summary["transformers"]["output_tokens_per_s"] == 2.5
    assert summary["speedup"] == 4.0 and summary["no_speedup_because"] is None
    assert speedup_text(summary) == "speedup 4.00x"
    assert summary["outputs_agree"]["requests_identical"] == 1


@pytest.mark.parametrize("ours, theirs, failed, mismatches, because", [
    # The context ended a request early: fewer tokens, so a ratio of requested tokens would flatter llminfer.
    ([finished([5, 6, 7]), finished([8])], [[5, 6, 7], [8, 9]], 0, 1, "1 of 2 requests got outputs of different"),
    # The engine refused a prompt (longer than the context, say): no tokens at all.
    ([finished([5, 6, 7]), finished([], "error", "prompt too long")], [[5, 6, 7], [8, 9]], 1, 1,
     "1 of 2 llminfer requests failed; 1 of 2"),
    ([finished([5, 6, 7]), finished([8, 9], "abort")], [[5, 6, 7], [8, 9]], 1, 0, "1 of 2 llminfer requests failed"),
    ([finished([]), finished([])], [[], []], 0, 0, "neither engine produced a token"),
])
def test_no_speedup_unless_both_engines_produced_the_same_tokens(ours, theirs, failed, mismatches, because):
    summary = summarize([Request([1], 3), Request([2], 2)], ours, theirs, 0.5, 2.0)
    assert summary["speedup"] is None and summary["no_speedup_because"].startswith(because)
    assert speedup_text(summary) == f"no speedup reported: {summary['no_speedup_because']}"
    assert summary["failed_requests"] == failed and summary["length_mismatches"] == mismatches
    assert summary["llminfer"]["output_tokens"] == sum(len(o.outputs[0].token_ids) for o in ours)
    assert summary["transformers"]["output_tokens"] == sum(map(len, theirs))


def test_cli_writes_the_json_record(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--model", "llama-tiny-random", "--num-prompts", "3", "--input-len", "4:8",
                 "--output-len", "2:3", "--max-num-seqs", "2", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["benchmark"] == "throughput" and record["machine"] and record["num_prompts"] == 3
    assert "speedup" in capsys.readouterr().out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llminfer: error: "), err
    return err[0]


def test_cli_refuses_requests_longer_than_the_context(capsys):
    resolve_model_path("llama-tiny-random")   # written once, with a progress bar, before the command runs
    capsys.readouterr()
    # llama-tiny-random's context is 512 tokens: a 500-token prompt leaves room for 12, not 20.
    assert main(["bench", "throughput", "--model", "llama-tiny-random", "--num-prompts", "1", "--input-len", "500",
                 "--output-len", "20"]) == 2
    error = one_line_error(capsys)
    assert all(number in error for number in ("500", "20", "512"))


@pytest.mark.parametrize("flag, value", [("--num-prompts", "0"), ("--max-num-seqs", "0"), ("--busy-cores", "-1")])
def test_cli_refuses_counts_out_of_range(flag, value, capsys):
    assert main(["bench", "throughput", "--model", "llama-tiny-random", "--input-len", "4", "--output-len", "2",
                 "--num-prompts", "1", flag, value]) == 2
    assert f"got {value}" in one_line_error(capsys)


def test_repeats_alternate_and_report_the_medians():
    result = run("llama-tiny-random", num_prompts=3, input_len=(3, 6), output_len=(2, 3), seed=0, max_num_seqs=2,
                 repeats=3)
    for engine in ("llminfer", "transformers"):
        runs = result[engine]["seconds_each_run"]
        assert len(runs) == 3 and result[engine]["seconds"] == sorted(runs)[1]
    # Every repeat starts with an empty prefix cache: the third run of the same prompts finds nothing cached.
    assert result["llminfer"]["prefix_cache_hit_tokens"] == 0
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        run("llama-tiny-random", num_prompts=1, input_len=(3, 3), output_len=(2, 2), seed=0, repeats=0)


def cpu_ticks(pid: int) -> int:
    """User CPU time a process has used so far, in clock ticks (field 14 of Linux's /proc/<pid>/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[11])


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads CPU time from Linux's /proc")
def test_busy_cores_spin_inside_the_block_and_are_gone_after():
    with busy_cores(1, max_seconds=60) as children:
        before = cpu_ticks(children[0].pid)
        deadline = time.monotonic() + 10
        while cpu_ticks(children[0].pid) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_ticks(children[0].pid) > before and children[0].poll() is None
    assert_gone(children[0].pid)


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_busy_cores_stop_when_the_body_raises(error):
    with pytest.raises(error):
        with busy_cores(1, max_seconds=60) as children:
            raise error()
    for child in children:
        assert_gone(child.pid)


def test_a_busy_core_left_running_stops_by_itself_at_its_deadline():
    with pytest.raises(RuntimeError, match="stopped before the end of the benchmark"):
        with busy_cores(1, max_seconds=0.2) as children:
            assert children[0].wait(timeout=30) == 0   # it exited on its own; a kill gives -9


@pytest.mark.parametrize("n", [-1, 1.5, True, (os.cpu_count() or 1) + 1])
def test_busy_cores_refuse_a_bad_count(n):
    with pytest.raises(ValueError, match=f"got {n!r}"):
        with busy_cores(n, max_seconds=1):
            pass
