"""The `llminfer` command, run as a user runs it, in a subprocess."""

import subprocess
import sys

import pytest

import llminfer


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llminfer.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_continuation():
    result = run("generate", "--model", "tiny-shakespeare", "--prompt", "ROMEO:", "--max-tokens", "64",
                 "--temperature", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    model, tokenizer = llminfer.load_model("tiny-shakespeare", device="cpu")
    expected = llminfer.generate(model, tokenizer, "ROMEO:", llminfer.SamplingParams(temperature=0, max_tokens=64))
    assert result.stdout == expected.text + "\n"
    assert len(expected.token_ids) == 64


@pytest.mark.parametrize("spec", ['{"model": "tiny-shakespeare-draft", "num_speculative_tokens": 3}',
                                  '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}'])
def test_generate_with_speculation_prints_the_same_greedy_text(spec):
    plain = run("generate", "--prompt", "ROMEO:", "--max-tokens", "40", "--temperature", "0", "--device", "cpu")
    fast = run("generate", "--prompt", "ROMEO:", "--max-tokens", "40", "--temperature", "0", "--device", "cpu",
               "--speculative-config", spec)
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout and "drafted tokens accepted" in fast.stderr


def test_generate_with_quantization_runs_the_quantized_model():
    plain = run("generate", "--prompt", "ROMEO:", "--max-tokens", "40", "--temperature", "0", "--device", "cpu")
    int4 = run("generate", "--prompt", "ROMEO:", "--max-tokens", "40", "--temperature", "0", "--device", "cpu",
               "--quantization", "int4")
    assert int4.returncode == 0, int4.stderr
    llm = llminfer.LLM("tiny-shakespeare", device="cpu", quantization="int4", cpu_threads=1)
    expected = llm.generate("ROMEO:", llminfer.SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert int4.stdout == expected[0].outputs[0].text + "\n" != plain.stdout


@pytest.mark.parametrize(
    "args, named",
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--prompt", ""], "prompt is empty"),
        (["--temperature", "-1"], "-1"),
        (["--top-p", "1.5"], "1.5"),
        (["--max-tokens", "0"], "max_tokens must be >= 1 or None, got 0"),
        (["--speculative-config", '{"method": "ngram"'], "--speculative-config is not valid JSON"),
        (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}'],
         "num_speculative_tokens must be an int in [1, 16], got 0"),
        (["--speculative-config", '[4]'], "--speculative-config must be a JSON object"),
        (["--quantization", "int3"], "quantization must be None or one of"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line_naming_it(args, named):
    base = {"--model": "tiny-shakespeare", "--prompt": "ROMEO:"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = run("generate", *[x for kv in base.items() for x in kv], "--device", "cpu")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert result.stdout == ""


def test_env_reports_each_dependency_device_and_triton():
    result = run("env")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for package in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "matplotlib", "tqdm"):
        assert any(line.startswith("[OK] " + package + " ") for line in lines), package
    assert any(line.startswith("device: ") for line in lines)
    assert any(line.startswith("triton kernels: ") for line in lines)


@pytest.mark.parametrize(
    "args, named",
    [
        (["no_such_file.ipynb"], "no_such_file.ipynb"),
        (["--exercise", "no_such_exercise", "x.py"], "no_such_exercise"),
        (["--timeout", "0", "x.py"], "--timeout must be > 0 seconds, got 0"),
        (["--memory-limit", "nan", "x.py"], "--memory-limit must be > 0 GiB, got nan"),
        (["--load-timeout", "-1", "x.py"], "--load-timeout must be > 0 seconds, got -1"),
        (["--run-as", "no such user \u00e9", "x.py"], "there is no such user"),
        ([], "nothing to grade"),
    ],
)
def test_grade_exits_non_zero_only_when_grading_cannot_run(args, named):
    result = run("grade", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_grade_lists_the_exercises():
    result = run("grade", "--list")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()][:2] == ["top_p", "min_p"]
