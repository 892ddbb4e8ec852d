"""What an exercise's tests use to judge an answer: checks that raise `Mismatch` with a message
naming what is wrong (the type, the shape, or the max error and the first bad index)."""

from __future__ import annotations

from numbers import Real

import torch

# Tolerances against the reference, by dtype: (atol, rtol). Integer and bool results must match exactly.
TOLERANCES = {
    torch.float64: (1e-6, 1e-6),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


class Mismatch(Exception):
    """The answer is wrong; the message says how, in one line."""


def expect_tensor(value: object, shape: tuple[int, ...], dtype: torch.dtype, what: str = "the result") -> torch.Tensor:
    """`value` itself, if it is a tensor of this shape and dtype."""
    if not isinstance(value, torch.Tensor):
        raise Mismatch(f"{what} is a {type(value).__name__}, expected a torch.Tensor of shape {list(shape)}")
    if tuple(value.shape) != tuple(shape):
        raise Mismatch(f"{what} has shape {list(value.shape)}, expected {list(shape)}")
    if value.dtype != dtype:
        raise Mismatch(f"{what} has dtype {value.dtype}, expected {dtype}")
    return value


def expect_close(actual: object, expected: torch.Tensor, what: str = "the result") -> str:
    """Pass if `actual` matches `expected` within the dtype's tolerance (-inf must meet -inf); say the max error."""
    actual = expect_tensor(actual, expected.shape, expected.dtype, what).detach().cpu()
    expected = expected.detach().cpu()
    atol, rtol = TOLERANCES.get(expected.dtype, (0.0, 0.0))
    a, e = actual.double(), expected.double()
    close = torch.isclose(a, e, rtol=rtol, atol=atol)     # equal infinities count as close
    if close.all():
        if not expected.is_floating_point():
            return "exact"
        finite = (a - e).abs().masked_fill(~torch.isfinite(e), 0.0)
        return f"max error {finite.max().item() if finite.numel() else 0.0:.1e}"
    first = tuple((~close).nonzero()[0].tolist())
    error = (a - e).abs().nan_to_num(nan=float("inf"), posinf=float("inf")).masked_fill(close, 0.0)
    worst = f"; max error {error.max().item():.3g}" if expected.is_floating_point() else ""
    raise Mismatch(
        f"{what}: {int((~close).sum())} of {close.numel()} values differ; first at index {list(first)}: "
        f"got {_show(actual[first].item())}, expected {_show(expected[first].item())}{worst}"
    )


def _show(value: float | bool) -> str:
    return str(value) if isinstance(value, bool) else f"{value:.6g}"


def expect_equal_number(actual: object, expected: float, what: str = "the result") -> str:
    """Pass if `actual` is a number equal to `expected` (to 1e-9 relative)."""
    if not isinstance(actual, Real) or isinstance(actual, bool):
        raise Mismatch(f"{what} is a {type(actual).__name__}, expected a number")
    if abs(actual - expected) > 1e-9 * abs(expected):
        raise Mismatch(f"{what} is {actual:,}, expected {expected:,} ({actual / expected:.4g}x)" if expected
                       else f"{what} is {actual:,}, expected 0")
    return f"{actual:,}"


def seeded(seed: int) -> torch.Generator:
    """A private random stream, so every run of a test sees the same inputs."""
    return torch.Generator().manual_seed(seed)
