"""The tiny Shakespeare corpus: where to find it, how it is checked, how it is split."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TRAIN_FRACTION = 0.9


def _candidate_paths() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[1]
    paths = []
    if os.environ.get("LLMINFER_DATA"):
        paths.append(Path(os.environ["LLMINFER_DATA"]) / "tinyshakespeare.txt")
    paths += [
        repo_root.parent / "shared" / "data" / "tinyshakespeare.txt",
        repo_root / "shared" / "data" / "tinyshakespeare.txt",
        Path.home() / ".cache" / "llminfer" / "tinyshakespeare.txt",
    ]
    return paths


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tinyshakespeare_text() -> str:
    """The whole corpus (1,115,394 characters), read locally or downloaded once and verified."""
    for path in _candidate_paths():
        if path.is_file():
            data = path.read_bytes()
            if _sha256(data) != TINYSHAKESPEARE_SHA256:
                raise ValueError(f"{path} does not have the expected sha256 {TINYSHAKESPEARE_SHA256}")
            return data.decode("utf-8")
    cache = _candidate_paths()[-1]
    with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as response:
        data = response.read()
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        raise ValueError(f"download from {TINYSHAKESPEARE_URL} has an unexpected sha256")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(data)
    return data.decode("utf-8")


def train_val_split(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """First `train_fraction` of the characters for training, the rest held out for validation."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]
