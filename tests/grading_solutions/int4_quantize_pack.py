"""Answer key for the exercise `int4_quantize_pack` (chapter 18, quantization): group-wise int4, two codes per byte.

Each row of w is cut into groups of group_size consecutive columns, each with its own scale and zero point by
GPTQ's asymmetric rule: the range [min(w, 0), max(w, 0)] is mapped onto the codes 0..15, so that 0.0 is exactly a
code. Byte i of a packed row holds code 2i in its low nibble and code 2i + 1 in its high nibble.
"""

import torch

_MAX_CODE = 15   # four bits: codes 0..15


def quantize_int4_packed(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out, in / 2], scales fp32 [out, in / group_size],
    zeros uint8 [out, in / group_size]); group_size divides in, and in is even."""
    out_features, in_features = w.shape
    # fp32 whatever w's dtype (fp16 would round the scales); a group on the last dimension.
    groups = w.float().reshape(out_features, in_features // group_size, group_size)

    low = groups.amin(-1).clamp(max=0)    # widen the range to include 0.0
    high = groups.amax(-1).clamp(min=0)
    # An all-zero group has an empty range: any positive scale will do (0 would make w / scale NaN); its codes
    # are then all equal to its zero point, 0.
    scales = ((high - low) / _MAX_CODE).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = torch.round(-low / scales).clamp(0, _MAX_CODE)   # the code that stands for 0.0

    # Round first, then add the zero point: round(x) + z and round(x + z) differ at ties (round half to even).
    codes = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp(0, _MAX_CODE)
    codes = codes.to(torch.uint8).reshape(out_features, in_features)

    # Pack in uint8 (the shift must not carry into a sign bit): even columns low, odd columns high.
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scales, zeros.to(torch.uint8)
