"""Which device and dtype to run on. Nothing here touches CUDA at import time."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """`LLMINFER_DEVICE` if set, else CUDA when a GPU is present, else the CPU."""
    requested = os.environ.get("LLMINFER_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU (exact, and bf16 is slow there); bf16 on GPUs that have it, else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
