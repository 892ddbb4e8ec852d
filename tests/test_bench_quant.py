"""`llminfer bench quant`: configuration names parsed or refused, a tiny run whose rows count the tokens produced
and whose ratios come from the rows, and arguments it cannot run refused in one line before anything loads."""

import json
import statistics
import subprocess
import sys

import pytest
import torch

from llminfer.bench import quant as bench
from llminfer.bench.throughput import random_requests
from llminfer.cli import main


@pytest.mark.parametrize("name, quantization, kv_cache_dtype", [
    ("float", None, "auto"), ("int8", "int8", "auto"), ("int4", "int4", "auto"), ("w8a8", "w8a8", "auto"),
    ("kv-int8", None, "int8"), ("int8+kv-int8", "int8", "int8"), ("kv-fp8+int4", "int4", "fp8"),
    ("float+kv-fp8_e5m2", None, "fp8_e5m2"),
])
def test_configuration_names_say_the_weights_and_the_cache(name, quantization, kv_cache_dtype):
    assert bench.parse_config(name) == bench.Config(name, quantization, kv_cache_dtype)


@pytest.mark.parametrize("name", ["int9", "", "kv-auto", "kv-int4", "int8+int4", "kv-int8+kv-fp8", "int8+", "INT8"])
def test_what_is_not_a_configuration_is_none(name):
    assert bench.parse_config(name) is None


def test_the_float_baseline_comes_first_even_when_not_named():
    assert [c.name for c in bench.parse_configs(["int8", "kv-int8"])] == ["float", "int8", "kv-int8"]
    assert [c.name for c in bench.parse_configs(("int4", "float"))] == ["float", "int4"]
    with pytest.raises(ValueError, match=r"unknown configuration\(s\) 'int9', 'kv-int4'"):
        bench.parse_configs(["int8", "int9", "kv-int4"])
    with pytest.raises(ValueError, match=r"'float\+kv-int8' repeat an earlier one"):
        bench.parse_configs(["kv-int8", "float+kv-int8"])
    with pytest.raises(ValueError, match="configs must be a list of names"):
        bench.parse_configs("int8")


def test_a_tiny_run_counts_the_tokens_produced_and_its_ratios_come_from_the_rows(tmp_path, capsys):
    path = tmp_path / "quant.json"
    assert main(["bench", "quant", "--configs", "int8+kv-int8", "--num-prompts", "4", "--input-len", "4:8",
                 "--output-len", "2:4", "--decode-tokens", "4", "--repeats", "1", "--kv-cache-memory-bytes",
                 str(2**22), "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["benchmark"] == "quant" and record["machine"]["cpu"] and record["git_commit"] is not None
    assert record["configs"] == ["float", "int8+kv-int8"] and record["torch_threads"] == torch.get_num_threads()
    rows = {row["config"]: row for row in record["rows"]}
    # Every request ran to its length (EOS ignored): the tokens counted are the tokens asked for.
    requests = random_requests(2048, 4, (4, 8), (2, 4), seed=0)
    for row in rows.values():
        for workload, requested in (("decode", 4), ("throughput", sum(r.output_len for r in requests))):
            entry = row[workload]
            assert entry["failed_requests"] == 0
            assert entry["requested_output_tokens"] == requested and entry["output_tokens_each_run"] == [requested]
            assert entry["output_tokens_per_s"] == pytest.approx(statistics.median(
                tokens / seconds for tokens, seconds in zip(entry["output_tokens_each_run"],
                                                            entry["seconds_each_run"], strict=True)))
            assert entry["ratio_to_float"] == pytest.approx(
                entry["output_tokens_per_s"] / rows["float"][workload]["output_tokens_per_s"])
        assert row["kv_cache_bytes"] <= 2**22
    assert rows["float"]["decode"]["ratio_to_float"] == rows["float"]["throughput"]["ratio_to_float"] == 1
    quantized = rows["int8+kv-int8"]
    assert quantized["quantization"] == "int8" and quantized["kv_cache_dtype"] == "int8"
    assert quantized["weight_bytes"] < rows["float"]["weight_bytes"] / 2     # the decoder's linears are most of it
    assert quantized["kv_blocks"] > 3 * rows["float"]["kv_blocks"]          # a byte and a scale per row, not 4 bytes
    table = capsys.readouterr().out
    assert "int8+kv-int8" in table and "1.00x" in table


def test_decode_only_fits_a_budget_below_the_models_context():
    # llama-tiny-random's context is 512 tokens; 4 fp32 blocks hold 64. The engines' max_model_len is the run's
    # longest request (the 32-token prompt and 4 tokens), so the float engine starts where 512 would not.
    result = bench.run("llama-tiny-random", configs=["int8"], decode_tokens=4, repeats=1, skip_throughput=True,
                       kv_cache_memory_bytes=4 * 8192, log=lambda line: None)
    assert result["max_model_len"] == 36 and result["num_prompts"] is None
    assert [(row["config"], row["kv_blocks"], row["throughput"]) for row in result["rows"]] == [
        ("float", 4, None), ("int8", 4, None)]
    assert all(row["decode"]["output_tokens_each_run"] == [4] for row in result["rows"])
    assert bench.format_table(result).splitlines()[-1].split()[-1] == "-"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llminfer: error: "), err
    return err[0]


@pytest.mark.parametrize("args, named", [
    (["--num-prompts", "0"], "num_prompts must be at least 1, got 0"),
    (["--decode-tokens", "-3"], "decode_tokens must be at least 1, got -3"),
    (["--repeats", "0"], "repeats must be at least 1, got 0"),
    (["--kv-cache-memory-bytes", "0"], "kv_cache_memory_bytes must be at least 1, got 0"),
    (["--configs", "int8,int9,kv-int3"], "unknown configuration(s) 'int9', 'kv-int3'"),
    (["--configs", "int8,,int4"], "unknown configuration(s) ''"),
    (["--input-len", "1000", "--output-len", "100"], "prompts of up to 1000 tokens plus outputs of up to 100 tokens "
                                                     "exceed the context of tiny-shakespeare (1024 tokens)"),
    (["--decode-tokens", "1000"], "decode_tokens 1000 plus the 32-token prompt exceed the context"),
    (["--input-len", "8:4"], "a length range needs 1 <= A <= B, got '8:4'"),
    (["--kv-cache-memory-bytes", "100000"], "kv_cache_memory_bytes 100000 holds 32 tokens"),
    (["--device", "tpu"], "device 'tpu'"),
])
def test_the_cli_refuses_what_it_cannot_measure_in_one_line(args, named, capsys):
    assert main(["bench", "quant", *args]) == 2
    assert named in one_line_error(capsys)


def test_the_command_exits_2_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "llminfer.cli", "bench", "quant", "--configs", "int8,fp4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "'fp4'" in result.stderr
    assert "Traceback" not in result.stderr
