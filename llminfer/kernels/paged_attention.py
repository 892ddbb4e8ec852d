"""Attention over the paged KV cache: decode (one new token per sequence) and prefill (many, causal).

Each Triton kernel walks a sequence's keys in tiles of BLOCK_N positions with the online softmax
(running max, running sum and rescaled accumulator, all fp32), so the scores of a whole sequence
never exist at once. A tile may span several cache blocks: every position looks up its own block in
the block table, so any block_size works. Both kernels give one program all the query heads that
share a KV head (GQA): each key and value is loaded once per group, not once per head. Decode can
also split a long context across programs and merge their partial softmaxes (flash-decoding).

A quantized cache (`llminfer.kv.quantized`: one-byte codes, then each row's fp32 scale) is read by the
same kernels with QUANT set: a tile's codes are loaded and upcast, and multiplied by their rows' scales.
"""

from __future__ import annotations

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.attention.reference import cache_attention
from llminfer.kernels import cpu
from llminfer.kv.quantized import dequantize_rows, head_dim_of, is_quantized

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the torch references are the only path
    triton = tl = None

jit = triton.jit if triton is not None else lambda fn: fn


@jit
def _attend_tile(q, row_max, row_sum, acc, k_cache, v_cache, block_table, kv_head, positions, in_range, visible,
                 stride_block, stride_slot, stride_head, scale,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 QUANT: tl.constexpr):
    """One online-softmax step: fold the keys/values at `positions` (those `visible` to each row) into
    the running max, the running sum of exp(score - max) and the accumulator, all fp32."""
    block = tl.load(block_table + positions // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    rows = block * stride_block + (positions % BLOCK_SIZE) * stride_slot + kv_head * stride_head
    dims = tl.arange(0, BLOCK_D)
    mask = in_range[:, None] & (dims[None, :] < HEAD_DIM)
    # Keys and values are upcast to q's dtype; fp16/bf16 dots accumulate in fp32 on the tensor cores.
    key = tl.load(k_cache + rows[:, None] + dims[None, :], mask=mask, other=0.0)
    value = tl.load(v_cache + rows[:, None] + dims[None, :], mask=mask, other=0.0)
    if QUANT:   # codes times their row's scale, the 4 bytes after the row's HEAD_DIM codes
        k_scale = tl.load((k_cache + rows + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=in_range, other=0.0)
        v_scale = tl.load((v_cache + rows + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=in_range, other=0.0)
        key = key.to(tl.float32) * k_scale[:, None]
        value = value.to(tl.float32) * v_scale[:, None]
    key, value = key.to(q.dtype), value.to(q.dtype)
    scores = tl.dot(q, tl.trans(key), input_precision=DOT_PRECISION) * scale
    scores = tl.where(visible, scores, float("-inf"))
    # Every row sees key 0 in its first tile, so row_max is finite after it and the rescale factor
    # exp(old max - new max) is never exp(-inf + inf) = NaN.
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    rescale = tl.exp(row_max - new_max)
    p = tl.exp(scores - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + tl.dot(p.to(value.dtype), value, input_precision=DOT_PRECISION)
    return new_max, row_sum, acc


@jit
def _paged_attention_decode_kernel(q, k_cache, v_cache, block_tables, seq_lens, out, partial_max, partial_sum,
                                   partial_acc, stride_q_seq, stride_q_head, stride_out_seq, stride_out_head,
                                   stride_table, stride_block, stride_slot, stride_head, scale, num_heads, split_len,
                                   num_splits, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                   SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr):
    # Grid (num_seqs, num_kv_heads, num_splits). Rows of the tile are the GROUP query heads of this KV
    # head, padded to BLOCK_G >= 16 (tl.dot's minimum); padded rows compute on zeros and are never stored.
    # Split s takes positions [s * split_len, (s + 1) * split_len): flash-decoding, so a few long
    # sequences still fill the GPU; the reduce kernel merges the splits. num_splits is a runtime value
    # (only SPLIT is compiled in), so a growing context does not trigger a recompile per split count.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    dims = tl.arange(0, BLOCK_D)
    mask = (group[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
    q_tile = tl.load(q + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :], mask=mask, other=0.0)
    row_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(split * split_len, tl.minimum(seq_len, (split + 1) * split_len), BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        in_range = positions < seq_len
        row_max, row_sum, acc = _attend_tile(q_tile, row_max, row_sum, acc, k_cache, v_cache,
                                             block_tables + seq * stride_table, kv_head, positions, in_range,
                                             in_range[None, :], stride_block, stride_slot, stride_head, scale,
                                             BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_PRECISION, QUANT)
    if not SPLIT:
        tl.store(out + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
                 (acc / row_sum[:, None]).to(out.dtype.element_ty), mask=mask)
    else:
        # Unnormalised partials; a split past the end of a short sequence stores max -inf, sum 0, acc 0.
        index = (seq * num_heads + heads) * num_splits + split
        tl.store(partial_max + index, row_max, mask=group < GROUP)
        tl.store(partial_sum + index, row_sum, mask=group < GROUP)
        tl.store(partial_acc + index[:, None] * HEAD_DIM + dims[None, :], acc, mask=mask)


@jit
def _paged_attention_decode_reduce_kernel(partial_max, partial_sum, partial_acc, out, stride_out_seq,
                                          stride_out_head, num_heads, num_splits, HEAD_DIM: tl.constexpr,
                                          BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # Grid (num_seqs, num_heads). Rescale each split by exp(its max - the global max) and normalise once.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    index = (seq * num_heads + head) * num_splits + splits
    maxes = tl.load(partial_max + index, mask=splits < num_splits, other=float("-inf"))
    sums = tl.load(partial_sum + index, mask=splits < num_splits, other=0.0)
    accs = tl.load(partial_acc + index[:, None] * HEAD_DIM + dims[None, :],
                   mask=(splits[:, None] < num_splits) & (dims[None, :] < HEAD_DIM), other=0.0)
    # Split 0 always holds key 0, so the global max is finite and empty splits get weight exp(-inf) = 0.
    weights = tl.exp(maxes - tl.max(maxes, 0))
    result = tl.sum(weights[:, None] * accs, 0) / tl.sum(weights * sums, 0)
    tl.store(out + seq * stride_out_seq + head * stride_out_head + dims, result.to(out.dtype.element_ty),
             mask=dims < HEAD_DIM)


@jit
def _paged_attention_prefill_kernel(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
                                    stride_q_token, stride_q_head, stride_out_token, stride_out_head, stride_table,
                                    stride_block, stride_slot, stride_head, scale,
                                    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr):
    # Grid (num_seqs, query tiles, num_kv_heads). A tile holds BLOCK_Q new tokens x GROUP query heads,
    # flattened to BLOCK_R rows (row r: token r // GROUP, head r % GROUP), so GQA heads share each key load.
    seq = tl.program_id(0)
    tile_start = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc + seq)
    num_new = tl.load(query_start_loc + seq + 1) - query_start
    if tile_start >= num_new:
        return
    seq_len = tl.load(seq_lens + seq)
    rows = tl.arange(0, BLOCK_R)
    token = tile_start + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < num_new)
    # New token j sits at position seq_len - num_new + j (a cached prefix comes first); padded rows
    # are clamped to the last position so that they, too, see key 0 and never produce NaN.
    query_pos = tl.minimum(seq_len - num_new + token, seq_len - 1)
    dims = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    q_offsets = (query_start + token[:, None]).to(tl.int64) * stride_q_token + heads[:, None] * stride_q_head
    q_tile = tl.load(q + q_offsets + dims[None, :], mask=mask, other=0.0)
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # Causal limit: no row of this tile sees past the position of its last token.
    kv_end = tl.minimum(seq_len, seq_len - num_new + tile_start + BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        visible = positions[None, :] <= query_pos[:, None]
        row_max, row_sum, acc = _attend_tile(q_tile, row_max, row_sum, acc, k_cache, v_cache,
                                             block_tables + seq * stride_table, kv_head, positions, positions < kv_end,
                                             visible, stride_block, stride_slot, stride_head, scale,
                                             BLOCK_SIZE, HEAD_DIM, BLOCK_D, DOT_PRECISION, QUANT)
    result = acc / row_sum[:, None]
    out_offsets = (query_start + token[:, None]).to(tl.int64) * stride_out_token + heads[:, None] * stride_out_head
    tl.store(out + out_offsets + dims[None, :], result.to(out.dtype.element_ty), mask=mask)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, bool, dict]:
    """Validate shapes; return the GQA group size, whether to take big tiles, and the constants both kernels share."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if (k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or head_dim_of(k_cache) != head_dim
            or num_heads % num_kv_heads):
        raise ValueError(f"paged attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} (num_heads must be a multiple of num_kv_heads)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged attention: caches must share strides, and head_dim must be contiguous")
    # Big tiles for 16-bit inputs on sm_80+, and in the interpreter (fewer steps run faster). Chosen from ptxas
    # reports, not timings: there they fit without register spills, while fp32 dots (FMA, not tensor cores)
    # and sm_75's 64 KB of shared memory need small ones.
    big = not q.is_cuda or (q.dtype != torch.float32 and torch.cuda.get_device_capability(q.device) >= (8, 0))
    # fp32 dots stay fp32 (not TF32) on the GPU, so fp32 results match the reference to 1e-4.
    constants = dict(BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                     DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", QUANT=is_quantized(k_cache))
    return num_heads // num_kv_heads, big, constants


def paged_attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  max_seq_len: int, block_n: int | None = None,
                                  num_splits: int | None = None) -> torch.Tensor:
    """Launch `_paged_attention_decode_kernel`: one program per (sequence, KV head, split of the context).

    By default a CUDA launch splits long contexts until there are about two programs per SM; on the
    interpreter (CPU) it does not split unless `num_splits` says so.
    """
    group, big, constants = _check(q, k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    block_n = block_n or (64 if big else 32)
    if num_splits is None and q.is_cuda:   # at least 512 positions per split
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = min(triton.cdiv(2 * sms, num_seqs * k_cache.shape[2]), triton.cdiv(max_seq_len, 512))
    # Every split gets a whole number of tiles, and no split lies wholly past max_seq_len.
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits or 1), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, split_len)
    partials = [torch.empty(num_seqs, num_heads, num_splits, *shape, dtype=torch.float32, device=q.device)
                for shape in ((), (), (head_dim,))] if num_splits > 1 else [out] * 3
    _paged_attention_decode_kernel[(num_seqs, k_cache.shape[2], num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, *partials, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), *k_cache.stride()[:3], scale, num_heads, split_len, num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, SPLIT=num_splits > 1,
        num_warps=4, num_stages=2, **constants,
    )
    if num_splits > 1:
        _paged_attention_decode_reduce_kernel[(num_seqs, num_heads)](
            *partials, out, out.stride(0), out.stride(1), num_heads, num_splits, HEAD_DIM=head_dim,
            BLOCK_D=constants["BLOCK_D"], BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out


def paged_attention_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                                   scale: float, max_query_len: int, max_seq_len: int,
                                   block_rows: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Launch `_paged_attention_prefill_kernel`: one program per (sequence, tile of new tokens, KV head)."""
    group, big, constants = _check(q, k_cache, v_cache)
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    block_rows = max(block_rows or (128 if big else 32), triton.next_power_of_2(group))
    block_n = block_n or (64 if big else 32)
    block_q = block_rows // group
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_q), k_cache.shape[2])
    _paged_attention_prefill_kernel[grid](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *k_cache.stride()[:3], scale,
        GROUP=group, BLOCK_Q=block_q, BLOCK_R=block_rows, BLOCK_N=block_n, num_warps=8 if big else 4,
        num_stages=3 if big else 2, **constants,
    )
    return out


def paged_attention_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                     max_seq_len: int) -> torch.Tensor:
    """Decode attention in plain PyTorch, block by block like PagedAttention (the engine's CPU path, too).

    Every cache block a sequence uses becomes one row of a batch: its query heads score the block's keys,
    and the partial softmaxes of a sequence's blocks are combined with the sequence's maximum. The work
    is proportional to the tokens stored, not to num_seqs x max_seq_len. `max_seq_len` is not needed.
    """
    num_seqs, num_heads, head_dim = q.shape
    total_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    device = q.device
    # Which sequence each used block belongs to, and its place in that sequence's block table.
    blocks_per_seq = -(-seq_lens // block_size)
    seq_of_block = torch.repeat_interleave(torch.arange(num_seqs, device=device), blocks_per_seq)
    first_block = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    index_in_seq = torch.arange(seq_of_block.numel(), device=device) - first_block[seq_of_block]
    block_ids = block_tables.long()[seq_of_block, index_in_seq]
    # One block = block_size x kv_heads keys. index_select copies whole blocks (rows of a 2-D view) in one
    # piece, much faster on CPU than advanced indexing of the 4-D cache, which copies element by element.
    # A quantized cache's blocks are dequantized after the copy. keys, values: [blocks, slots x kv, d].
    keys, values = (dequantize_rows(cache.flatten(1, 3).index_select(0, block_ids).view(-1, *cache.shape[1:]))
                    .reshape(block_ids.numel(), -1, head_dim) for cache in (k_cache, v_cache))
    # Each query head scores all keys of its block, those of the other KV heads too (num_kv_heads x the
    # arithmetic, but two plain batched matmuls); the mask keeps its own KV head and positions < seq_len.
    scores = torch.bmm(q.index_select(0, seq_of_block).float(), keys.float().transpose(1, 2)) * scale
    heads = torch.arange(num_kv_heads, device=device)
    own_head = heads[:, None, None, None] == heads                                     # [kv, 1, 1, kv]
    positions = index_in_seq[:, None] * block_size + torch.arange(block_size, device=device)
    stored = positions < seq_lens[seq_of_block][:, None]                               # [blocks, slots]
    visible = own_head[None] & stored[:, None, None, :, None]                          # [blocks, kv, 1, slots, kv]
    scores = scores.view(-1, num_kv_heads, num_heads // num_kv_heads, block_size, num_kv_heads)
    scores = scores.masked_fill_(~visible, float("-inf")).view(-1, num_heads, block_size * num_kv_heads)
    # Softmax across a sequence's blocks: subtract the sequence's max (block 0 always holds position 0, so
    # it is finite), then normalise the summed exponentials once.
    seq_max = torch.full((num_seqs, num_heads), float("-inf"), device=device)
    seq_max.scatter_reduce_(0, seq_of_block[:, None].expand(-1, num_heads), scores.amax(-1), "amax")
    weights = torch.exp(scores - seq_max.index_select(0, seq_of_block)[:, :, None])
    total = torch.zeros(num_seqs, num_heads, device=device).index_add_(0, seq_of_block, weights.sum(-1))
    out = torch.zeros(num_seqs, num_heads, head_dim, device=device)
    out.index_add_(0, seq_of_block, torch.bmm(weights, values.float()))
    return (out / total[:, :, None]).to(q.dtype)


def paged_attention_prefill_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                                      block_tables: torch.Tensor, scale: float, max_query_len: int,
                                      max_seq_len: int) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cache: `cache_attention` with these arguments."""
    # cache_attention reads neither positions nor slots; num_decodes=0 claims no decode-only prefix.
    empty = torch.empty(0, dtype=torch.long, device=q.device)
    meta = AttentionMetadata(positions=empty, query_start_loc=query_start_loc, seq_lens=seq_lens,
                             slot_mapping=empty, block_tables=block_tables, block_size=k_cache.shape[1],
                             num_decodes=0, max_query_len=max_query_len, max_seq_len=max_seq_len)
    return cache_attention(q, k_cache, v_cache, meta, scale)


def _memoized(memo: dict | None, key: str, compute):
    """compute(), or what an earlier layer of the same step computed (`memo` lives on the step's metadata)."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_seq_len: int, memo: dict | None = None
                           ) -> torch.Tensor:
    """Attention of one new token per sequence [num_seqs, num_heads, head_dim] over its cached context.

    `seq_lens` counts the new token, whose K/V must already be stored. CUDA: Triton; fp32 on the CPU: the
    C kernel of `llminfer.kernels.cpu` when it builds; else the reference. `memo` (the step's metadata's)
    keeps what the first layer derives from the metadata for the others.
    """
    if q.is_cuda and triton is not None:
        return paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)
    if cpu.supports(q, k_cache):
        rows = _memoized(memo, "cpu_decode_rows", lambda: cpu.prepare_rows(
            block_tables, torch.arange(q.shape[0], device=q.device), seq_lens, k_cache.shape[1]))
        return cpu.attend_rows(q, k_cache, v_cache, rows, scale)
    return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_query_len: int, max_seq_len: int, memo: dict | None = None
                            ) -> torch.Tensor:
    """Causal attention of each sequence's last n_i tokens (flattened [num_tokens, heads, head_dim]) over
    its cache, which already holds their K/V. CUDA: Triton; fp32 on the CPU: the C kernel of
    `llminfer.kernels.cpu` when it builds; else the reference. `memo` as for `paged_attention_decode`."""
    if q.is_cuda and triton is not None:
        return paged_attention_prefill_triton(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                              max_query_len, max_seq_len)
    if cpu.supports(q, k_cache):
        def rows() -> cpu.Rows:
            # Row i of sequence s sits at position seq_len - (end of s's rows - i) and sees keys up to it.
            num_new = query_start_loc[1:] - query_start_loc[:-1]
            row_seq = torch.repeat_interleave(torch.arange(num_new.numel(), device=q.device), num_new)
            row_len = seq_lens[row_seq] - query_start_loc[1:][row_seq] + torch.arange(q.shape[0], device=q.device) + 1
            return cpu.prepare_rows(block_tables, row_seq, row_len, k_cache.shape[1])

        prepared = _memoized(memo, "cpu_prefill_rows", rows)
        return cpu.attend_rows(q, k_cache, v_cache, prepared, scale)
    return paged_attention_prefill_reference(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                             max_query_len, max_seq_len)
