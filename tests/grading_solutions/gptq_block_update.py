"""Answer key for the exercise `gptq_block_update` (chapter 18, quantization): one block of GPTQ.

u is the upper Cholesky factor of the inverse Hessian over the columns still to round (u.T @ u = H^-1). After
rounding column j to q_j, the columns not yet rounded move by -err_j * u[j, :], with err_j = (w[:, j] - q_j) /
u[j, j]: the Optimal Brain Surgeon update, read off row j of the factor. Inside the block each column is updated
before it is rounded; the columns after the block receive all of the block's errors at once, in one matmul.
"""

import torch

_MAX_CODE = 15


def gptq_quantize_block(w: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on the first block_size columns of w [out, n]: (their codes uint8 [out, block_size],
    the other columns after compensation [out, n - block_size])."""
    w = w.clone()                       # the caller's weight is left as it was
    zeros_f = zeros.to(w.dtype)         # uint8 arithmetic would wrap around
    codes = torch.empty(w.shape[0], block_size, dtype=torch.uint8, device=w.device)
    errors = torch.empty(w.shape[0], block_size, dtype=w.dtype, device=w.device)

    for i in range(block_size):
        column = w[:, i]
        # Round to nearest as in group-wise int4: round first, then add the zero point, then clamp.
        code = (torch.round(column / scales) + zeros_f).clamp(0, _MAX_CODE)
        codes[:, i] = code.to(torch.uint8)
        quantized = (code - zeros_f) * scales
        errors[:, i] = (column - quantized) / u[i, i]
        # The rest of the block now, so that column i + 1 is compensated before it is rounded. (Column i itself
        # moves too, by exactly its rounding error; it is done and not returned.)
        w[:, i:block_size] -= errors[:, i, None] * u[i, i:block_size]

    # The columns after the block: the sum of every column's update, err [out, block] @ u [block, rest].
    rest = w[:, block_size:] - errors @ u[:block_size, block_size:]
    return codes, rest
