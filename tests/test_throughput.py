"""The throughput benchmark's machinery on a tiny random model: same requests, agreeing outputs, a ratio."""

import json

import pytest

from llminfer.bench.throughput import agreement, parse_range, random_requests, run
from llminfer.cli import main


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
    assert result["output_tokens"] == sum(r.output_len for r in requests)
    assert result["outputs_agree"]["token_agreement"] > 0.95
    assert result["speedup"] == pytest.approx(result["transformers"]["seconds"] / result["llminfer"]["seconds"])


def test_cli_writes_the_json_record(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--model", "llama-tiny-random", "--num-prompts", "3", "--input-len", "4:8",
                 "--output-len", "2:3", "--max-num-seqs", "2", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["benchmark"] == "throughput" and record["machine"] and record["num_prompts"] == 3
    assert "speedup" in capsys.readouterr().out


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
