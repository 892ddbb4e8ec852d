"""A broken checkpoint, config, tokenizer or device gives one error that names the file or value and the
problem, and the CLI prints it on one line, without a traceback."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llminfer.cli import main
from llminfer.device import parse_device
from llminfer.models.loader import load_checkpoint, load_model
from llminfer.models.registry import SHIPPED

SHIPPED_DIR = SHIPPED["tiny-shakespeare"]
WEIGHTS_SIZE = (SHIPPED_DIR / "model.safetensors").stat().st_size


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A copy of the shipped model, to damage."""
    return Path(shutil.copytree(SHIPPED_DIR, tmp_path / "model"))


def edit_config(model_dir: Path, **changes) -> None:
    """Rewrite config.json with `changes`; a change to None removes the key."""
    file = model_dir / "config.json"
    config = json.loads(file.read_text()) | changes
    file.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def cut_in_half(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: WEIGHTS_SIZE // 2])


def test_truncated_weights_are_named(model_dir):
    cut_in_half(model_dir)
    with pytest.raises(ValueError, match=f"{model_dir / 'model.safetensors'} is not a valid safetensors file"):
        load_model(model_dir, device="cpu")


def test_garbage_weights_are_named(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"this is not a tensor file" * 100)
    with pytest.raises(ValueError, match=f"{model_dir / 'model.safetensors'} is not a valid safetensors file"):
        load_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def scratch_dir(tmp_path_factory) -> Path:
    return Path(shutil.copytree(SHIPPED_DIR, tmp_path_factory.mktemp("scratch") / "model"))


@settings(max_examples=20, deadline=None)
@given(cut=st.integers(0, WEIGHTS_SIZE - 1))
def test_weights_cut_anywhere_are_named(scratch_dir, cut):
    weights = scratch_dir / "model.safetensors"
    weights.write_bytes((SHIPPED_DIR / "model.safetensors").read_bytes()[:cut])
    with pytest.raises(ValueError, match=str(weights)):
        load_checkpoint(scratch_dir, device="cpu")


@settings(max_examples=20, deadline=None)
@given(garbage=st.binary(max_size=4096))
def test_random_bytes_as_weights_are_named(scratch_dir, garbage):
    weights = scratch_dir / "model.safetensors"
    weights.write_bytes(garbage)
    with pytest.raises(ValueError, match=str(scratch_dir)):
        load_checkpoint(scratch_dir, device="cpu")


def test_a_missing_shard_is_named(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    shards = {"lm_head.weight": "model-00001-of-00002.safetensors",
              "model.norm.weight": "model-00002-of-00002.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(FileNotFoundError, match=f"{model_dir / 'model-00002-of-00002.safetensors'} is missing"):
        load_model(model_dir, device="cpu")


def test_an_invalid_index_is_named(model_dir):
    (model_dir / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=f"{model_dir / 'model.safetensors.index.json'} is not valid JSON"):
        load_model(model_dir, device="cpu")


@pytest.mark.parametrize("name", ["./no-such-model-dir", "/no/such/model-dir"])
def test_a_model_directory_that_does_not_exist_is_named(name):
    with pytest.raises(FileNotFoundError, match=f"model directory '{name}' does not exist"):
        load_model(name, device="cpu")


def test_a_weights_file_given_as_the_model_is_named(model_dir):
    weights = model_dir / "model.safetensors"
    with pytest.raises(ValueError, match=f"model '{weights}' is a file: give the directory"):
        load_model(weights, device="cpu")


def test_invalid_json_config_is_named(model_dir):
    (model_dir / "config.json").write_text('{"hidden_size": 256,')
    with pytest.raises(ValueError, match=f"{model_dir / 'config.json'} is not valid JSON"):
        load_model(model_dir, device="cpu")


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers",
                                 "intermediate_size", "max_position_embeddings"])
def test_a_missing_config_key_is_named(model_dir, key):
    edit_config(model_dir, **{key: None})
    with pytest.raises(ValueError, match=f"{model_dir / 'config.json'}: required key '{key}' is missing"):
        load_model(model_dir, device="cpu")


@pytest.mark.parametrize("key, value", [("hidden_size", "big"), ("hidden_size", 0), ("num_attention_heads", -8),
                                        ("vocab_size", 2048.5), ("num_hidden_layers", True), ("head_dim", [32])])
def test_a_config_value_of_the_wrong_type_is_named(model_dir, key, value):
    edit_config(model_dir, **{key: value})
    expected = f"{model_dir / 'config.json'}: {key} must be a positive integer, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_model(model_dir, device="cpu")


@pytest.mark.parametrize("content", [b'{"version": "1.0", "model": ', b'{"added_tokens": [], "model": 3}', b"\xff\xfe"])
def test_a_broken_tokenizer_is_named(model_dir, content):
    (model_dir / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot load the tokenizer in {model_dir}: "):
        load_model(model_dir, device="cpu")


@pytest.mark.parametrize("device, problem", [("bogus", "is not a device name"), ("cuda:x", "is not a device name"),
                                             ("meta", "llminfer runs on cpu, cuda, mps")])
def test_a_bogus_device_is_named(device, problem):
    with pytest.raises(ValueError, match=f"device '{device}'.* {problem}"):
        load_model("tiny-shakespeare", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_so(device):
    with pytest.raises(ValueError, match=f"device '{device}' needs a CUDA GPU, and torch sees none"):
        load_model("tiny-shakespeare", device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_index_beyond_the_last_is_named():
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device 'cuda:{count}': this machine has {count} CUDA GPU"):
        parse_device(f"cuda:{count}")


def test_a_bogus_default_device_names_the_variable(monkeypatch):
    monkeypatch.setenv("LLMINFER_DEVICE", "bogus")
    with pytest.raises(ValueError, match="LLMINFER_DEVICE: device 'bogus'"):
        load_model("tiny-shakespeare")


@pytest.mark.parametrize("damage, named", [
    (cut_in_half, "model.safetensors is not a valid safetensors file"),
    (lambda d: edit_config(d, hidden_size=None), "config.json: required key 'hidden_size' is missing"),
    (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    (lambda d: (d / "tokenizer.json").write_text("{"), "cannot load the tokenizer in"),
])
def test_generate_with_a_broken_model_prints_one_line(model_dir, damage, named, capsys):
    damage(model_dir)
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llminfer: error: ") and named in lines[0], captured.err
    assert str(model_dir) in lines[0] and "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("argv, named", [
    (["generate", "--prompt", "x", "--device", "bogus"], "device 'bogus' is not a device name"),
    (["bench", "throughput", "--device", "bogus", "--num-prompts", "1"], "device 'bogus' is not a device name"),
])
def test_cli_names_a_bogus_device_on_one_line(argv, named, capsys):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_env_names_a_bogus_default_device_on_one_line(monkeypatch, capsys):
    monkeypatch.setenv("LLMINFER_DEVICE", "cuda:x")
    assert main(["env"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["llminfer: error: LLMINFER_DEVICE: device 'cuda:x' is not a device name like 'cpu', 'cuda' or "
                     "'cuda:1'"]
