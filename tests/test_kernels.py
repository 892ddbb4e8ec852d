"""The Triton kernels of Part II agree with their torch references, and the references with dense attention.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so these
shapes are tiny and odd: head_dim 24/48, one KV head shared by three query heads, blocks of 4 tokens,
sequences that end mid-block, shuffled block tables padded with -1, and a cache whose unused slots
hold large random values (a kernel that reads a slot it should not fails loudly).
"""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from llminfer.attention import write_kv
from llminfer.kernels import (
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_triton,
    paged_attention_prefill,
    paged_attention_prefill_reference,
    paged_attention_prefill_triton,
    store_kv,
    store_kv_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


@dataclass
class Batch:
    """Sequences' queries, their contiguous K/V, and the same K/V scattered into a paged cache."""
    q: torch.Tensor                 # [num_tokens, num_heads, head_dim], flattened new tokens
    keys: list[torch.Tensor]        # per sequence [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor      # int32, shuffled block ids, padded with -1
    seq_lens: torch.Tensor          # int64
    query_start_loc: torch.Tensor   # int64
    num_new: list[int]
    scale: float


def make_batch(cached: list[int], new: list[int], num_kv_heads: int, group: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device: str = DEVICE) -> Batch:
    lens = [c + n for c, n in zip(cached, new)]
    keys = [torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device) for n in lens]
    values = [torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device) for n in lens]
    q = torch.randn(sum(new), num_kv_heads * group, head_dim, dtype=dtype, device=device)
    needed = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(needed) + 3                     # spare blocks nobody owns
    order = torch.randperm(num_blocks).tolist()      # not contiguous, not in order
    # Finite junk, not NaN: the torch reference reads padding slots and relies on their probability being 0.
    k_cache = 1e3 * torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = 1e3 * torch.randn_like(k_cache)
    tables = []
    for seq, n in enumerate(needed):
        blocks, order = order[:n], order[n:]
        tables.append(blocks + [-1] * (max(needed) + 1 - n))
        # Scatter by (block, offset) indexing, independently of write_kv and store_kv.
        positions = torch.arange(lens[seq], device=device)
        block_ids = torch.tensor(blocks, device=device)[positions // block_size]
        k_cache[block_ids, positions % block_size] = keys[seq]
        v_cache[block_ids, positions % block_size] = values[seq]
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    as_long = dict(dtype=torch.long, device=device)
    return Batch(q, keys, values, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device=device),
                 torch.tensor(lens, **as_long), torch.tensor(starts, **as_long), new, head_dim**-0.5)


def dense_attention(batch: Batch) -> torch.Tensor:
    """Causal attention of each sequence's last new tokens over its contiguous K/V, in fp32."""
    out = []
    for i, (keys, values) in enumerate(zip(batch.keys, batch.values)):
        begin, end = int(batch.query_start_loc[i]), int(batch.query_start_loc[i + 1])
        group = batch.q.shape[1] // keys.shape[1]
        positions = torch.arange(len(keys) - (end - begin), len(keys), device=keys.device)
        mask = torch.arange(len(keys), device=keys.device)[None, :] <= positions[:, None]
        k, v = (x.float().repeat_interleave(group, dim=1).transpose(0, 1) for x in (keys, values))
        out.append(F.scaled_dot_product_attention(batch.q[begin:end].float().transpose(0, 1), k, v, attn_mask=mask,
                                                  scale=batch.scale).transpose(0, 1))
    return torch.cat(out)


def decode_args(batch: Batch) -> tuple:
    return (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale,
            int(batch.seq_lens.max()))


def prefill_args(batch: Batch) -> tuple:
    return (batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
            batch.scale, max(batch.num_new), int(batch.seq_lens.max()))


# (context lengths, num_kv_heads, query heads per KV head, head_dim, block_size, tile size of the kernel)
DECODE_CASES = {
    "gqa3-d24-bs4": ([1, 5, 17, 33], 1, 3, 24, 4, 16),
    "mha-d48-bs16": ([33, 2, 16], 2, 1, 48, 16, 64),
    "gqa4-d80-bs8": ([7, 40, 3], 2, 4, 80, 8, 32),
}
# (cached tokens, new tokens, ...): prompts, a chunk after a cached prefix, a decode, crossing blocks.
PREFILL_CASES = {
    "gqa3-d24-bs4": ([0, 12, 4, 16], [5, 5, 1, 17], 1, 3, 24, 4, 16),
    "gqa2-d48-bs16": ([0, 20, 32], [33, 13, 1], 2, 2, 48, 16, 64),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_reference_matches_dense_attention(case, dtype):
    lens, kv_heads, group, head_dim, block_size, _ = DECODE_CASES[case]
    batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size, dtype)
    expected = dense_attention(batch)
    assert_close(paged_attention_decode_reference(*decode_args(batch)), expected, dtype)
    assert_close(paged_attention_decode(*decode_args(batch)), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernel_matches_reference(case, dtype):
    lens, kv_heads, group, head_dim, block_size, block_n = DECODE_CASES[case]
    batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size, dtype)
    out = paged_attention_decode_triton(*decode_args(batch), block_n=block_n)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert_close(out, paged_attention_decode_reference(*decode_args(batch)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["gqa3-d24-bs4", "gqa4-d80-bs8"])
def test_split_kv_decode_kernel_matches_reference(case, dtype):
    # Flash-decoding: each split of the context is attended separately, then merged; the short
    # sequences leave later splits empty.
    lens, kv_heads, group, head_dim, block_size, block_n = DECODE_CASES[case]
    batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size, dtype)
    out = paged_attention_decode_triton(*decode_args(batch), block_n=block_n, num_splits=3)
    assert_close(out, paged_attention_decode_reference(*decode_args(batch)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_reference_matches_dense_attention(case, dtype):
    cached, new, kv_heads, group, head_dim, block_size, _ = PREFILL_CASES[case]
    batch = make_batch(cached, new, kv_heads, group, head_dim, block_size, dtype)
    expected = dense_attention(batch)
    assert_close(paged_attention_prefill_reference(*prefill_args(batch)), expected, dtype)
    assert_close(paged_attention_prefill(*prefill_args(batch)), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_kernel_matches_reference(case, dtype):
    cached, new, kv_heads, group, head_dim, block_size, block = PREFILL_CASES[case]
    batch = make_batch(cached, new, kv_heads, group, head_dim, block_size, dtype)
    out = paged_attention_prefill_triton(*prefill_args(batch), block_rows=block, block_n=block)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert_close(out, paged_attention_prefill_reference(*prefill_args(batch)), dtype)


def test_prefill_kernel_of_single_new_tokens_is_the_decode_kernel():
    batch = make_batch([0, 6, 30], [1, 1, 1], 1, 3, 24, 4, torch.float32)
    assert_close(paged_attention_prefill_triton(*prefill_args(batch), block_rows=16, block_n=16),
                 paged_attention_decode_triton(*decode_args(batch), block_n=16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("store", [store_kv_triton, store_kv, write_kv], ids=["triton", "dispatch", "reference"])
def test_store_kv_writes_each_slot_and_skips_minus_one(store, dtype):
    num_blocks, block_size, kv_heads, head_dim = 5, 4, 3, 24
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    # A strided view, as K/V come out of a fused qkv projection.
    qkv = torch.randn(6, 3, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([7, -1, 0, 19, -1, 9], device=DEVICE)
    if store is write_kv:
        write_kv(k_cache, v_cache, k, v, slots)
    else:
        store(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[token]) and torch.equal(flat_v[slot], v[token]), f"slot {slot}"
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[[s for s in slots.tolist() if s >= 0]] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, kv_heads, head_dim)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, kv_heads, head_dim)[untouched])


def test_shapes_that_do_not_fit_are_refused():
    batch = make_batch([4], [1], 2, 2, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_decode_triton(batch.q[:, :3], *decode_args(batch)[1:])
    with pytest.raises(ValueError, match="do not fit"):
        store_kv_triton(batch.q[:, :2, :16], batch.q[:, :2, :16], batch.k_cache, batch.v_cache, batch.seq_lens)


# On a GPU: the compiled kernels at model-like sizes, in fp16 and bf16.
GPU_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 1, 128, 16), (4, 8, 128, 16), (2, 2, 80, 32)], ids=str)
def test_gpu_decode_kernel_at_model_sizes(shape, dtype):
    group, kv_heads, head_dim, block_size = shape
    lens = [1, 17, 511, 1000, 4096]
    batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size, dtype)
    assert_close(paged_attention_decode(*decode_args(batch)), paged_attention_decode_reference(*decode_args(batch)),
                 dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 1, 128, 16), (4, 8, 128, 16), (2, 2, 80, 32)], ids=str)
def test_gpu_prefill_kernel_at_model_sizes(shape, dtype):
    group, kv_heads, head_dim, block_size = shape
    batch = make_batch([0, 1000, 3000, 4095], [1024, 300, 1096, 1], kv_heads, group, head_dim, block_size, dtype)
    assert_close(paged_attention_prefill(*prefill_args(batch)), paged_attention_prefill_reference(*prefill_args(batch)),
                 dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_store_kv_matches_write_kv(dtype):
    k_cache = torch.zeros(300, 16, 8, 128, dtype=dtype, device="cuda")
    v_cache, expected_k, expected_v = torch.zeros_like(k_cache), k_cache.clone(), k_cache.clone()
    k, v = torch.randn(2, 1000, 8, 128, dtype=dtype, device="cuda")
    slots = torch.randperm(300 * 16, device="cuda")[:1000]
    slots[::7] = -1
    store_kv(k, v, k_cache, v_cache, slots)
    write_kv(expected_k, expected_v, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
