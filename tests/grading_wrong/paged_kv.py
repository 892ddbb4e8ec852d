"""Wrong block allocators and wrong paged decode kernels (defined under the interpreter: conftest sets
TRITON_INTERPRET before this module is imported)."""

import triton
import triton.language as tl


class _Allocator:
    """A right allocator, with one flaw chosen by the subclasses below."""

    def __init__(self, num_blocks):
        self.free_list = list(range(num_blocks))
        self.counts = [0] * num_blocks

    @property
    def num_free(self):
        return len(self.free_list)

    def ref_count(self, block_id):
        return self.counts[block_id]

    def allocate(self, n):
        if n > len(self.free_list):
            return None
        ids, self.free_list = self.free_list[:n], self.free_list[n:]
        for i in ids:
            self.counts[i] = 1
        return ids

    def share(self, block_id):
        if self.counts[block_id] == 0:
            raise ValueError("free block")
        self.counts[block_id] += 1

    def free(self, block_ids):
        for i in block_ids:
            if self.counts[i] == 0:
                raise ValueError("double free")
        for i in block_ids:
            self.release(i)

    def release(self, block_id):
        self.counts[block_id] -= 1
        if self.counts[block_id] == 0:
            self.free_list.append(block_id)


class NeverReturns(_Allocator):
    """Counts down, but forgets to put a block back on the free list at 0."""

    def release(self, block_id):
        self.counts[block_id] -= 1


class DecrementsTwice(_Allocator):
    def release(self, block_id):
        self.counts[block_id] = max(self.counts[block_id] - 2, 0)
        if self.counts[block_id] == 0 and block_id not in self.free_list:
            self.free_list.append(block_id)


class PartialAllocation(_Allocator):
    """Not all or nothing: takes what is free, then reports failure."""

    def allocate(self, n):
        if n > len(self.free_list):
            for i in self.free_list:
                self.counts[i] = 1
            self.free_list = []
            return None
        return super().allocate(n)


class FreesSharedBlocks(_Allocator):
    """Puts a block back on the free list on any free, whoever else still holds it."""

    def release(self, block_id):
        self.counts[block_id] = 0
        self.free_list.append(block_id)


class NoDoubleFreeCheck(_Allocator):
    """Frees a free block again: it then sits twice on the free list and is handed out twice."""

    def free(self, block_ids):
        for i in block_ids:
            self.counts[i] = max(self.counts[i] - 1, 0)
            if self.counts[i] == 0:
                self.free_list.append(i)


class ShareDoesNotCount(_Allocator):
    def share(self, block_id):
        pass


@triton.jit
def _decode(q, k_cache, v_cache, block_tables, seq_lens, out, scale,
            stride_q_seq, stride_q_head, stride_table, stride_block, stride_slot, stride_head,
            GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, SCALE: tl.constexpr, LOOKUP: tl.constexpr, MASK_SCORES: tl.constexpr,
            TILED_HEADS: tl.constexpr, RESCALE: tl.constexpr):
    """Paged decode attention with one switch flipped from the right one (True everywhere, TILED_HEADS False)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if TILED_HEADS:
        kv_head = head % (tl.num_programs(1) // GROUP)
    else:
        kv_head = head // GROUP
    seq_len = tl.load(seq_lens + seq)
    dims = tl.arange(0, BLOCK_D)
    in_dim = dims < HEAD_DIM
    q_row = tl.load(q + seq * stride_q_seq + head * stride_q_head + dims, mask=in_dim, other=0.0).to(tl.float32)
    row_max = tl.full([], float("-inf"), tl.float32)
    row_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < seq_len
        if LOOKUP:
            block = tl.load(block_tables + seq * stride_table + positions // BLOCK_SIZE, mask=valid, other=0)
        else:
            block = positions // BLOCK_SIZE
        rows = block.to(tl.int64) * stride_block + (positions % BLOCK_SIZE) * stride_slot + kv_head * stride_head
        mask = valid[:, None] & in_dim[None, :]
        keys = tl.load(k_cache + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        values = tl.load(v_cache + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        scores = tl.sum(keys * q_row[None, :], 1)
        if SCALE:
            scores = scores * scale
        if MASK_SCORES:
            scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 0))
        weights = tl.exp(scores - new_max)
        if RESCALE:
            rescale = tl.exp(row_max - new_max)
        else:
            rescale = tl.full([], 1.0, tl.float32)
        row_sum = row_sum * rescale + tl.sum(weights, 0)
        acc = acc * rescale + tl.sum(weights[:, None] * values, 0)
        row_max = new_max
    tl.store(out + seq * stride_q_seq + head * stride_q_head + dims, (acc / row_sum).to(out.dtype.element_ty),
             mask=in_dim)


@triton.jit
def no_scale(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
             stride_block, stride_slot, stride_head, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    _decode(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
            stride_block, stride_slot, stride_head, GROUP, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, True, True, False, True)


@triton.jit
def position_as_block(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head,
                      stride_table, stride_block, stride_slot, stride_head, GROUP: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    _decode(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
            stride_block, stride_slot, stride_head, GROUP, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, False, True, False, True)


@triton.jit
def unmasked_scores(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head,
                    stride_table, stride_block, stride_slot, stride_head, GROUP: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    _decode(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
            stride_block, stride_slot, stride_head, GROUP, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, True, False, False, True)


@triton.jit
def tiled_kv_heads(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head,
                   stride_table, stride_block, stride_slot, stride_head, GROUP: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    _decode(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
            stride_block, stride_slot, stride_head, GROUP, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, True, True, True, True)


@triton.jit
def no_rescale(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
               stride_block, stride_slot, stride_head, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    _decode(q, k_cache, v_cache, block_tables, seq_lens, out, scale, stride_q_seq, stride_q_head, stride_table,
            stride_block, stride_slot, stride_head, GROUP, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, True, True, False, False)


WRONG = {
    "block_allocator": {
        "never returns a block to the free list": NeverReturns,
        "decrements twice": DecrementsTwice,
        "not all or nothing": PartialAllocation,
        "frees shared blocks while still referenced": FreesSharedBlocks,
        "no double-free check": NoDoubleFreeCheck,
        "share does not count": ShareDoesNotCount,
    },
    "paged_decode_kernel": {
        "missing scale": no_scale,
        "position as block id (no block table)": position_as_block,
        "no masking of positions past seq_len": unmasked_scores,
        "KV heads tiled, not grouped": tiled_kv_heads,
        "online softmax without rescaling": no_rescale,
    },
}
