"""Shared test settings: offline Hub, fixed seeds, tolerances per dtype, GPU marker."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here must load without a network

import numpy as np
import pytest
import torch

# Without a CUDA GPU, Triton kernels run in its interpreter. @triton.jit reads this when a kernel is
# defined, so it must be set before llminfer.kernels is imported (importing torch does not import triton).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

# Tolerances for comparisons against a reference, by dtype (one place for the whole suite).
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Like torch.testing.assert_close with the suite's tolerance; its message names the worst index."""
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
