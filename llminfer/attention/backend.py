"""The attention backend the model calls: store the new keys and values, then attend over the cache.

A step's batch may mix decodes (one new token) and prefills (many). The model runner puts the decodes
first, so `meta.num_decodes` splits the batch: the decode kernel takes the head, the prefill kernel
the rest. Each kernel runs compiled Triton on CUDA, C on an fp32 CPU (`llminfer.kernels.cpu`), and
its plain-PyTorch reference otherwise.
"""

from __future__ import annotations

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.kernels import paged_attention_decode, paged_attention_prefill, store_kv


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Store k, v [num_tokens, kv_heads, head_dim] at their slots, then attend with q [num_tokens, heads, head_dim]."""
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = q.shape[-1] ** -0.5
    decodes, num_seqs = meta.num_decodes, meta.num_seqs
    if decodes == num_seqs:
        return paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len,
                                      memo=meta.memo)
    if decodes == 0:
        return paged_attention_prefill(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                       scale, meta.max_query_len, meta.max_seq_len, memo=meta.memo)
    out = torch.empty_like(q)
    # The first `decodes` sequences own exactly the first `decodes` query rows.
    out[:decodes] = paged_attention_decode(q[:decodes], k_cache, v_cache, meta.block_tables[:decodes],
                                           meta.seq_lens[:decodes], scale, meta.max_seq_len, memo=meta.memo)
    out[decodes:] = paged_attention_prefill(q[decodes:], k_cache, v_cache, meta.query_start_loc[decodes:] - decodes,
                                            meta.seq_lens[decodes:], meta.block_tables[decodes:], scale,
                                            meta.max_query_len, meta.max_seq_len, memo=meta.memo)
    return out
