"""Chapter 6, paged KV memory: a block allocator with reference counts, and a Triton kernel for paged
decode attention.

The kernel is graded where it runs: a kernel defined under Triton's interpreter (`TRITON_INTERPRET=1`,
set before the kernel is decorated) runs on CPU tensors, a compiled one on the GPU.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from collections.abc import Callable

import torch

from llminfer.grading.compare import Mismatch, expect_close, seeded
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading.remote import run_kernel
from llminfer.grading.support import PAGED_BLOCK_N as BLOCK_N
from llminfer.kernels import paged_attention_decode_reference
from llminfer.kv import BlockPool

try:
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import InterpreterError
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Triton ships for Linux only: the kernel exercise then explains why it cannot run
    triton = tl = None

CHAPTER = "chapters/engine/06_paged_kv"


# --- the block allocator ---------------------------------------------------------------------------------------


class ReferenceBlockAllocator:
    """Block ids with reference counts, on llminfer's `BlockPool` (blocks of one token, no prefix cache)."""

    def __init__(self, num_blocks: int):
        self.pool = BlockPool(num_blocks, block_size=1, enable_prefix_caching=False)

    @property
    def num_free(self) -> int:
        return self.pool.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self.pool.blocks[block_id].ref_count

    def allocate(self, n: int) -> list[int] | None:
        table: list[int] = []
        return table if self.pool.allocate(table, n) else None

    def share(self, block_id: int) -> None:
        block = self.pool.blocks[block_id]
        if block.ref_count == 0:
            raise ValueError(f"block {block_id} is free: only a block in use can be shared")
        self.pool.allocate([], 1, prefix=[block])   # a new table that starts with this block: its count + 1

    def free(self, block_ids: list[int]) -> None:
        for block_id, times in Counter(block_ids).items():
            if times > self.ref_count(block_id):
                raise ValueError(f"block {block_id} freed {times} times but held {self.ref_count(block_id)} times")
        self.pool.free(list(block_ids))   # BlockPool.free empties the list it is given: give it a copy


class _Checked:
    """A student's allocator driven next to the expected reference counts, checking it after every call."""

    def __init__(self, allocator_class, num_blocks: int):
        self.allocator, self.num_blocks = allocator_class(num_blocks), num_blocks
        self.counts = [0] * num_blocks
        self.verify("after __init__")

    def verify(self, when: str) -> None:
        free = self.counts.count(0)
        if self.allocator.num_free != free:
            raise Mismatch(f"{when}: num_free is {self.allocator.num_free}, expected {free}")
        for block_id, count in enumerate(self.counts):
            if self.allocator.ref_count(block_id) != count:
                raise Mismatch(f"{when}: ref_count({block_id}) is {self.allocator.ref_count(block_id)}, "
                               f"expected {count}")

    def allocate(self, n: int) -> list[int] | None:
        free = self.counts.count(0)
        ids = self.allocator.allocate(n)
        when = f"allocate({n}) with {free} free"
        if n > free:
            if ids is not None:
                raise Mismatch(f"{when} returned {ids}, expected None (all or nothing)")
        else:
            if not isinstance(ids, list) or len(ids) != n:
                raise Mismatch(f"{when} returned {ids!r}, expected a list of {n} block ids")
            if len(set(ids)) != n or not all(isinstance(i, int) and 0 <= i < self.num_blocks for i in ids):
                raise Mismatch(f"{when} returned {ids}: expected {n} distinct ids in [0, {self.num_blocks})")
            taken = [i for i in ids if self.counts[i]]
            if taken:
                raise Mismatch(f"{when} returned block {taken[0]}, which is still in use "
                               f"(reference count {self.counts[taken[0]]})")
            for i in ids:
                self.counts[i] = 1
        self.verify(f"after {when}")
        return ids

    def share(self, block_id: int) -> None:
        self.allocator.share(block_id)
        self.counts[block_id] += 1
        self.verify(f"after share({block_id})")

    def free(self, block_ids: list[int]) -> None:
        self.allocator.free(list(block_ids))
        for i in block_ids:
            self.counts[i] -= 1
        self.verify(f"after free({block_ids})")


def _allocate_some(allocator_class) -> str:
    checked = _Checked(allocator_class, 8)
    ids = checked.allocate(3)
    return f"got blocks {ids}"


def _all_or_nothing(allocator_class) -> str:
    checked = _Checked(allocator_class, 7)
    checked.allocate(4)
    checked.allocate(4)                 # 3 free: must return None and take nothing
    checked.allocate(3)                 # ... so these 3 are still there
    checked.allocate(1)
    return "refused, and nothing was taken"


def _reuse(allocator_class) -> str:
    checked = _Checked(allocator_class, 6)
    ids = checked.allocate(6)
    checked.free([ids[1], ids[4]])
    again = checked.allocate(2)
    if sorted(again) != sorted([ids[1], ids[4]]):
        raise Mismatch(f"after freeing {ids[1]} and {ids[4]} of 6 blocks, allocate(2) returned {again}")
    checked.allocate(1)
    return "freed blocks came back"


def _shared_block(allocator_class) -> str:
    checked = _Checked(allocator_class, 4)
    ids = checked.allocate(2)
    checked.share(ids[0])               # two tables hold ids[0]
    checked.free(ids)                   # the first table ends: ids[0] is still held by the second
    others = checked.allocate(3)        # the three free blocks, never the shared one
    checked.allocate(1)
    checked.free([ids[0]])
    checked.allocate(1)
    return f"block {ids[0]} was not handed out while shared; blocks {others} were"


def _double_free(allocator_class) -> str:
    checked = _Checked(allocator_class, 4)
    ids = checked.allocate(2)
    checked.free([ids[0]])
    try:
        checked.allocator.free([ids[0]])
    except ValueError:
        checked.verify(f"after the refused second free({[ids[0]]})")
        checked.allocate(3)             # every block exactly once
        checked.allocate(1)
        return "refused, and nothing changed"
    raise Mismatch(f"freeing block {ids[0]} a second time did not raise ValueError")


def _fork(allocator_class) -> str:
    checked = _Checked(allocator_class, 6)
    table = checked.allocate(4)
    for block_id in table:              # a forked request shares its parent's whole table
        checked.share(block_id)
    checked.free(table)
    checked.allocate(2)
    checked.allocate(1)
    checked.free(table)
    checked.allocate(4)
    return "the fork kept its blocks until it ended"


def _random_operations(allocator_class, seed: int = 7, num_blocks: int = 10, steps: int = 200) -> str:
    """Random allocations, forks and frees of whole tables, as an engine makes them."""
    rng = random.Random(seed)
    checked = _Checked(allocator_class, num_blocks)
    tables: list[list[int]] = []
    for _ in range(steps):
        action = rng.random()
        if action < 0.45 or not tables:
            ids = checked.allocate(rng.randint(0, 5))
            if ids is not None:
                tables.append(ids)
        elif action < 0.6:
            table = rng.choice(tables)
            for block_id in table:
                checked.share(block_id)
            tables.append(list(table))
        else:
            checked.free(tables.pop(rng.randrange(len(tables))))
    return f"{steps} operations, all consistent"


def _zero(allocator_class) -> str:
    checked = _Checked(allocator_class, 3)
    if checked.allocate(0) != []:
        raise Mismatch("allocate(0) did not return an empty list")
    return "[]"


BLOCK_ALLOCATOR_TESTS = (
    ExerciseTest("allocate 3 of 8 blocks: distinct free ids, each with count 1", 1, _allocate_some),
    ExerciseTest("all or nothing: asking for 4 when 3 are free returns None and takes nothing", 2, _all_or_nothing),
    ExerciseTest("freed blocks are handed out again", 1, _reuse),
    ExerciseTest("a shared block stays in use until its last reference is freed", 2, _shared_block),
    ExerciseTest("freeing a block twice raises ValueError and changes nothing", 1, _double_free),
    ExerciseTest("fork a table of 4 blocks, free the parent, then the fork", 1, _fork),
    ExerciseTest("200 random allocations, forks and frees of 10 blocks", 2, _random_operations),
    ExerciseTest("allocate(0) returns an empty list", 1, _zero, visible=False),
)


# --- the paged decode kernel -----------------------------------------------------------------------------------

def _reference_kernel(q, k_cache, v_cache, block_tables, seq_lens, out, scale,
                      stride_q_seq, stride_q_head, stride_table, stride_block, stride_slot, stride_head,
                      GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The exercise's solution: one query head of one sequence over its context, a tile of BLOCK_N positions at a
    time, with the online softmax. (llminfer's `_paged_attention_decode_kernel` does the same for a whole group
    of query heads per program, with tl.dot, and can split a long context across programs.)"""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP                       # query heads h*GROUP .. h*GROUP+GROUP-1 share KV head h
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
        # Paging: a position's block id comes from the table; its slot within the block is position % BLOCK_SIZE.
        block = tl.load(block_tables + seq * stride_table + positions // BLOCK_SIZE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_block + (positions % BLOCK_SIZE) * stride_slot + kv_head * stride_head
        mask = valid[:, None] & in_dim[None, :]
        keys = tl.load(k_cache + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        values = tl.load(v_cache + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(keys * q_row[None, :], 1) * scale, float("-inf"))
        # Position 0 is in the first tile, so row_max is finite from then on and the rescale is never NaN.
        new_max = tl.maximum(row_max, tl.max(scores, 0))
        weights = tl.exp(scores - new_max)
        rescale = tl.exp(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(weights, 0)
        acc = acc * rescale + tl.sum(weights[:, None] * values, 0)
        row_max = new_max
    tl.store(out + seq * stride_q_seq + head * stride_q_head + dims, (acc / row_sum).to(out.dtype.element_ty),
             mask=in_dim)


reference_paged_decode_kernel = triton.jit(_reference_kernel) if triton is not None else _reference_kernel


def _paged_inputs(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                  seed: int, dtype: torch.dtype):
    """A pool with more blocks than needed, every slot holding random values (stale ones included), and block
    tables that take each sequence's blocks from shuffled places in the pool."""
    g = seeded(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 1                     # one padding entry (-1) at least, for every sequence
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n] + [-1] * (width - n))
        used += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32)


def _kernel_test(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, seed: int,
                 scale: float = 0.3, dtype: torch.dtype = torch.float32):
    def run(kernel) -> str:
        q, k_cache, v_cache, tables, lens = _paged_inputs(seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                                                          seed, dtype)
        # The reference in fp32 (fp16 matmuls are missing on some CPUs), compared at the dtype's tolerance.
        expected = paged_attention_decode_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale,
                                                    max(seq_lens)).to(dtype)
        out = run_kernel(kernel, "paged_decode", (q, k_cache, v_cache, tables, lens), scale)
        return expect_close(out, expected, "the output")

    return run


PAGED_DECODE_TESTS = (
    ExerciseTest("one sequence of 7 tokens in blocks of 4, one head", 1, _kernel_test([7], 1, 1, 16, 4, seed=61)),
    ExerciseTest("3 sequences (5, 12, 9 tokens), blocks scattered over the pool", 2,
                 _kernel_test([5, 12, 9], 2, 2, 16, 4, seed=62)),
    ExerciseTest("a context of 41 tokens: longer than one tile of 16", 2, _kernel_test([41, 3], 2, 1, 16, 5, seed=63)),
    ExerciseTest("grouped-query: 6 query heads share 2 KV heads", 2, _kernel_test([6, 17], 6, 2, 16, 4, seed=64)),
    ExerciseTest("head_dim 24 (not a power of two), block size 3, one KV head", 1,
                 _kernel_test([10, 4], 4, 1, 24, 3, seed=65)),
    ExerciseTest("stale values past seq_len are ignored (a context of 1 token)", 1,
                 _kernel_test([1, 2], 2, 2, 16, 4, seed=66)),
    ExerciseTest("the scale passed in, not 1/sqrt(head_dim)", 1, _kernel_test([9], 2, 1, 16, 4, seed=67, scale=1.7)),
    ExerciseTest("fp16 query and cache, fp16 output", 1,
                 _kernel_test([13, 7], 4, 2, 16, 4, seed=68, dtype=torch.float16), visible=False),
)

EXERCISES = [
    Exercise("block_allocator", "a block allocator with reference counts", CHAPTER, "BlockAllocator",
             ReferenceBlockAllocator, BLOCK_ALLOCATOR_TESTS, mirrors=("llminfer.kv.block_pool",)),
    # The interpreter runs a kernel ~1000x slower than compiled: give each test more time.
    Exercise("paged_decode_kernel", "a Triton kernel for paged decode attention", CHAPTER, "paged_decode_kernel",
             reference_paged_decode_kernel, PAGED_DECODE_TESTS, timeout=60.0,
             mirrors=("llminfer.kernels", "llminfer.attention")),
]
