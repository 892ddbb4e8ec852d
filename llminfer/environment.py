"""What `llminfer env` reports: dependencies, the device, and how Triton kernels would run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

from llminfer.bench.record import cpu_model
from llminfer.device import default_device

REQUIRED = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "matplotlib", "tqdm"]
OPTIONAL = {"jupyter-book": "book extra", "vllm": "vllm extra, GPU only"}


def cache_root() -> Path:
    """Where llminfer keeps what it builds or writes once (random checkpoints, compiled kernels):
    `$LLMINFER_CACHE`, else `~/.cache/llminfer`."""
    return Path(os.environ.get("LLMINFER_CACHE", Path.home() / ".cache" / "llminfer"))


def dependency_rows() -> list[tuple[str, str, str]]:
    """(status, package, detail) per dependency; status is OK, FAIL, or -- for an absent optional one."""
    required = REQUIRED + (["triton"] if sys.platform == "linux" else [])
    rows = []
    for name in required + list(OPTIONAL):
        try:
            rows.append(("OK", name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            if name in OPTIONAL:
                rows.append(("--", name, f"not installed ({OPTIONAL[name]})"))
            else:
                rows.append(("FAIL", name, "not installed"))
    return rows


def device_description() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"cuda:0 {torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    return f"cpu {cpu_model()} ({torch.get_num_threads()} threads), no GPU"


def triton_mode() -> str:
    """How a Triton kernel would run here: compiled on a GPU, interpreted, or not at all."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "unavailable: kernels fall back to their PyTorch references"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreted (TRITON_INTERPRET=1): correct but ~1000x slower than compiled"
    if torch.cuda.is_available():
        return "compiled for the GPU"
    return "not compiled (no GPU): CPU attention runs in C; TRITON_INTERPRET=1 runs the Triton kernels interpreted"


def cpu_kernel_mode() -> str:
    """Whether the engine's CPU attention can run in C here, without building anything."""
    from llminfer.kernels import cpu

    reason = cpu.unavailable_reason()
    if reason:
        return f"unavailable ({reason}): attention on CPU uses the PyTorch reference"
    return f"C, built on first use with {cpu.compiler_path()} into {cpu.cache_dir()}"


def report() -> tuple[list[str], bool]:
    """The lines `llminfer env` prints, and whether every required dependency is present."""
    rows = dependency_rows()
    lines = [f"[{status}] {name} {detail}" for status, name, detail in rows]
    lines.append(f"python {platform.python_version()} on {platform.system()} {platform.machine()}")
    lines.append(f"device: {device_description()}")
    chosen_by = " (LLMINFER_DEVICE)" if os.environ.get("LLMINFER_DEVICE") else ""
    lines.append(f"llminfer runs on: {default_device()}{chosen_by}")   # an invalid LLMINFER_DEVICE raises here
    lines.append(f"triton kernels: {triton_mode()}")
    lines.append(f"cpu attention kernel: {cpu_kernel_mode()}")
    return lines, all(status != "FAIL" for status, _, _ in rows)
