"""Which device and dtype to run on. Nothing here touches CUDA at import time."""

from __future__ import annotations

import os

import torch

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, refusing a malformed name and a device this machine does not have,
    so that the mistake is named here rather than deep inside torch at the first tensor."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name like 'cpu', 'cuda' or 'cuda:1'") from None
    if parsed.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device {device!r}: llminfer runs on {', '.join(SUPPORTED_DEVICE_TYPES)}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count()   # 0 without a GPU or with a CPU-only torch; initialises nothing
        if count == 0:
            raise ValueError(f"device {device!r} needs a CUDA GPU, and torch sees none on this machine")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} needs Apple's Metal (MPS), which is not available on this machine")
    return parsed


def default_device() -> torch.device:
    """`LLMINFER_DEVICE` if set, else CUDA when a GPU is present, else the CPU."""
    requested = os.environ.get("LLMINFER_DEVICE")
    if requested:
        try:
            return parse_device(requested)
        except ValueError as exc:
            raise ValueError(f"LLMINFER_DEVICE: {exc}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU (exact, and bf16 is slow there); bf16 on GPUs that have it, else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
