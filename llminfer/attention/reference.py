"""Attention over a KV cache in plain PyTorch: the reference every fast kernel is tested against.

Cache tensors are shaped [num_blocks, block_size, num_kv_heads, head_dim], one K and one V
per layer. The contiguous cache of Part I is the special case of one block per sequence. A quantized
cache (`llminfer.kv.quantized`) has one-byte codes and a scale in each row, [..., head_dim + 4]: rows
are quantized when written and dequantized when read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.attention.metadata import AttentionMetadata
from llminfer.kv.quantized import dequantize_rows, is_quantized, quantize_rows


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each new token's K and V [num_tokens, kv_heads, head_dim] at its slot (skip slot -1); a quantized
    cache gets each row's codes and scale."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for cache, new in ((k_cache, k), (v_cache, v)):
        if is_quantized(cache):   # copied as bytes: torch has no CPU index_copy_ for fp8
            cache, new = cache.view(torch.uint8), quantize_rows(new, cache.dtype).view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, new.to(cache.dtype))


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float | None = None) -> torch.Tensor:
    """Causal attention of the new queries [num_tokens, heads, head_dim] over each sequence's cached
    keys and values (which already include the new tokens' own)."""
    out = torch.empty_like(q)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        begin, end = starts[i], starts[i + 1]
        num_blocks = -(-seq_len // meta.block_size)
        blocks = meta.block_tables[i, :num_blocks].long()
        keys = dequantize_rows(k_cache.index_select(0, blocks)).flatten(0, 1)[:seq_len]  # [seq_len, kv, head_dim]
        values = dequantize_rows(v_cache.index_select(0, blocks)).flatten(0, 1)[:seq_len]
        # New token j sits at position seq_len - n_new + j and sees every key up to its own position.
        n_new = end - begin
        if n_new == seq_len:  # nothing cached before: plain causal attention (and a fused kernel)
            mask, causal = None, True
        else:
            query_pos = torch.arange(seq_len - n_new, seq_len, device=q.device)
            mask, causal = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None], False
        out[begin:end] = F.scaled_dot_product_attention(
            q[begin:end].transpose(0, 1), keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != keys.shape[1],
        ).transpose(0, 1)
    return out
