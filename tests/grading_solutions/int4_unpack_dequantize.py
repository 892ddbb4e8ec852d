"""Answer key for the exercise `int4_unpack_dequantize` (chapter 18, quantization): unpack and dequantize.

Byte i of a packed row holds column 2i's code in its low nibble and column 2i + 1's in its high nibble; column k
belongs to group k // group_size, and its weight is (code - zero) * scale with that group's zero point and scale.
"""

import torch


def dequantize_int4_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """packed uint8 [out, in / 2], scales fp32 and zeros uint8 [out, in / group_size] -> the weight
    (code - zero) * scale, fp32 [out, in]."""
    low = packed & 0x0F          # the even columns' codes
    high = packed >> 4           # the odd columns' codes (uint8: a logical shift)
    codes = torch.stack([low, high], dim=-1).flatten(-2)   # interleave: column 2i, then 2i + 1

    # Every column gets its own group's scale and zero point: repeat_interleave repeats each group group_size
    # times in place (repeat would tile the whole row of groups instead).
    column_scales = scales.float().repeat_interleave(group_size, dim=1)
    column_zeros = zeros.float().repeat_interleave(group_size, dim=1)
    # Subtract in float: in uint8, 3 - 5 would wrap around to 254.
    return (codes.float() - column_zeros) * column_scales
