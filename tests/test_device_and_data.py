import subprocess
import sys

import pytest
import torch

from llminfer.datasets import TINYSHAKESPEARE_SHA256, tinyshakespeare_text, train_val_split
from llminfer.device import default_device, default_dtype
from llminfer.models.registry import resolve_model_path


def test_import_makes_no_cuda_call():
    code = "import llminfer, torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_default_device_honours_the_environment(monkeypatch):
    monkeypatch.setenv("LLMINFER_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.delenv("LLMINFER_DEVICE")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_dtype("cpu") == torch.float32


def test_corpus_is_verified_and_split_90_10():
    import hashlib

    text = tinyshakespeare_text()
    assert hashlib.sha256(text.encode()).hexdigest() == TINYSHAKESPEARE_SHA256
    train, val = train_val_split(text)
    assert train + val == text and len(train) == int(0.9 * len(text))


def test_corrupt_corpus_is_refused(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    monkeypatch.setenv("LLMINFER_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="sha256"):
        tinyshakespeare_text()


@pytest.mark.parametrize("name", ["no-such-model", "a/b/c"])
def test_unknown_model_names_are_named(name):
    with pytest.raises(ValueError, match=name):
        resolve_model_path(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(tmp_path)
