"""Answer key for the exercise `paged_decode_kernel` (chapter 6, paged KV memory): paged decode attention in Triton.

One program per (sequence, query head). It walks the sequence's context in tiles of BLOCK_N positions, finds
each position's KV block through the block table, and folds the tile into an online softmax kept in fp32.

Under Triton's interpreter (no GPU), TRITON_INTERPRET=1 must be set before this module is imported: `@triton.jit`
decides between interpreter and compiler when the kernel is defined.
"""

import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(q, k_cache, v_cache, block_tables, seq_lens, out, scale,
                        stride_q_seq, stride_q_head, stride_table, stride_block, stride_slot, stride_head,
                        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (seq, head): out[seq, head] = softmax(scale * K q) V over the seq_lens[seq] cached positions
    of KV head head // GROUP. `out` has q's shape and strides."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP                 # grouped-query: GROUP consecutive query heads share one KV head
    seq_len = tl.load(seq_lens + seq)

    # The query row, padded from HEAD_DIM to the power of two BLOCK_D with zeros (masked dimensions).
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_offset = seq * stride_q_seq + head * stride_q_head
    query = tl.load(q + q_offset + dims, mask=dim_ok, other=0.0).to(tl.float32)

    # Online softmax state, in fp32 whatever the input dtype: the running maximum m_i, the running sum l_i of
    # exp(score - m_i) (names as in the FlashAttention papers), and the accumulator of the weighted values.
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)

    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < seq_len              # the last tile may run past the context: those slots hold stale data

        # Paging: position p lives in block block_tables[seq, p // BLOCK_SIZE], at slot p % BLOCK_SIZE.
        # Padding entries (-1) are never read, as only valid positions load their block id.
        block_id = tl.load(block_tables + seq * stride_table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        row = block_id.to(tl.int64) * stride_block + (pos % BLOCK_SIZE) * stride_slot + kv_head * stride_head
        tile_ok = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache + row[:, None] + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.load(v_cache + row[:, None] + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)

        # Scores of the tile; invalid positions get -inf, so exp() gives them weight 0.
        s = tl.sum(k * query[None, :], 1) * scale
        s = tl.where(pos_ok, s, float("-inf"))

        # Fold the tile in. The first tile holds position 0, so m_i is finite after it and alpha is never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)         # rescales what was accumulated under the old maximum
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new

    result = acc / l_i
    tl.store(out + q_offset + dims, result.to(out.dtype.element_ty), mask=dim_ok)
