"""Answer key for the exercise `int4_gemv_triton` (chapter 18, quantization): int4 weights dequantized in a GEMV.

One program per (token, BLOCK_N output rows). It walks the input features BLOCK_K at a time; each step loads the
BLOCK_K // 2 packed bytes of its tile once, splits every byte into its two nibbles (the low one is an even column,
the high one the odd column after it), dequantizes them in registers, and adds their products with x to an fp32
accumulator. The dequantized weight is never written to memory.

Under Triton's interpreter (no GPU), TRITON_INTERPRET=1 must be set before this module is imported: `@triton.jit`
decides between interpreter and compiler when the kernel is defined.
"""

import triton
import triton.language as tl


@triton.jit
def int4_gemv_kernel(x, packed, scales, zeros, out, out_features, in_features,
                     GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (token, n): out[token, r] = sum over k of x[token, k] * (code[r, k] - zero) * scale, the zero point
    and scale of row r's group k // GROUP_SIZE, for the BLOCK_N rows r of block n."""
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features                  # the last block of rows may run past out_features
    bytes_per_row = in_features // 2              # row strides: everything is contiguous
    groups_per_row = in_features // GROUP_SIZE
    x_row = x + token * in_features

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        # The tile's bytes; byte b holds columns 2b (low nibble) and 2b + 1 (high nibble). in_features is even,
        # so a byte inside the row has both of its columns inside it too.
        byte = start // 2 + tl.arange(0, BLOCK_K // 2)
        byte_ok = byte < bytes_per_row
        even = 2 * byte
        odd = even + 1
        tile_ok = row_ok[:, None] & byte_ok[None, :]

        # Masked loads give 0, so columns past in_features (and rows past out_features) add nothing.
        x_even = tl.load(x_row + even, mask=byte_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + odd, mask=byte_ok, other=0.0).to(tl.float32)
        packed_bytes = tl.load(packed + rows[:, None] * bytes_per_row + byte[None, :], mask=tile_ok, other=0)
        packed_bytes = packed_bytes.to(tl.int32)
        code_even = packed_bytes & 0xF
        code_odd = (packed_bytes >> 4) & 0xF

        # Each column's group: a tile may hold several groups (small GROUP_SIZE) or part of one.
        group_even = rows[:, None] * groups_per_row + even[None, :] // GROUP_SIZE
        group_odd = rows[:, None] * groups_per_row + odd[None, :] // GROUP_SIZE
        # int32 zero points: in uint8, code - zero would wrap around when negative.
        zero_even = tl.load(zeros + group_even, mask=tile_ok, other=0).to(tl.int32)
        zero_odd = tl.load(zeros + group_odd, mask=tile_ok, other=0).to(tl.int32)
        scale_even = tl.load(scales + group_even, mask=tile_ok, other=0.0).to(tl.float32)
        scale_odd = tl.load(scales + group_odd, mask=tile_ok, other=0.0).to(tl.float32)

        w_even = (code_even - zero_even).to(tl.float32) * scale_even
        w_odd = (code_odd - zero_odd).to(tl.float32) * scale_odd
        acc += tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], 1)

    tl.store(out + token * out_features + rows, acc.to(out.dtype.element_ty), mask=row_ok)
