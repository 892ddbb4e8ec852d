"""Model names the book uses, and how a name becomes a local Hugging Face-format directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = {
    "tiny-shakespeare": ASSETS / "tiny-shakespeare",
    "tiny-shakespeare-draft": ASSETS / "tiny-shakespeare-draft",
}
DEFAULT_MODEL = "tiny-shakespeare"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def default_model_name() -> str:
    """The model chapters run: `LLMINFER_MODEL` if set (a Hub id on a GPU box), else the shipped one."""
    return os.environ.get("LLMINFER_MODEL", DEFAULT_MODEL)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped name, a random-weight shape (`RANDOM_MODELS`), a local directory, or a Hub id (downloaded once)."""
    from llminfer.models.random_init import RANDOM_MODELS, random_checkpoint

    name = str(name_or_path)
    if name in SHIPPED:
        return SHIPPED[name]
    if name in RANDOM_MODELS:
        return random_checkpoint(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {name!r} has no config.json")
        return path
    if path.is_file():
        raise ValueError(f"model {name!r} is a file: give the directory that holds its config.json and weights")
    if path.is_absolute() or name.startswith((".", "~")):   # a local path (a Hub id starts with neither)
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    if _HUB_ID.match(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as exc:
            raise ValueError(f"cannot load model {name!r} from the Hugging Face Hub: {type(exc).__name__}") from exc
    raise ValueError(
        f"unknown model {name!r}: not a shipped model ({', '.join(SHIPPED)}), a local directory, or a Hub id"
    )
