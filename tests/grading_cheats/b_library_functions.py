"""Import the library functions the exercises mirror: llminfer's own min-p filter and RoPE."""

from llminfer.models.llama import apply_rope as _rotate
from llminfer.models.llama import rope_cos_sin, rope_inv_freq
from llminfer.sampling import apply_min_p  # noqa: F401  (the answer, as it is)


def apply_rope(x, positions, theta=10000.0):
    return _rotate(x, *rope_cos_sin(positions, rope_inv_freq(x.shape[-1], theta)))
