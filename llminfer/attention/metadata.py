"""What attention needs to know about a batch of sequences that share one KV cache.

The batch is *flattened*: the new tokens of every sequence are concatenated into one
[num_tokens] vector (no padding). Sequence i owns the new tokens
`query_start_loc[i] : query_start_loc[i + 1]`, has `seq_lens[i]` tokens of context once
they are added (those already cached plus the new ones), and keeps its keys and values in
the cache blocks `block_tables[i]`, `block_size` tokens each. A token's *slot* is
`block_id * block_size + offset`; slot -1 means "do not store" (padding).

Prefill, chunked prefill and decode are all described this way: a decode step is a
sequence with one new token, a prefill one with all its prompt tokens new.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor        # [num_tokens] position of each new token in its sequence
    query_start_loc: torch.Tensor  # [num_seqs + 1] offsets of each sequence's new tokens
    seq_lens: torch.Tensor         # [num_seqs] context length of each sequence after this step
    slot_mapping: torch.Tensor     # [num_tokens] cache slot for each new token's K and V; -1 = skip
    block_tables: torch.Tensor     # [num_seqs, max_blocks] cache block ids of each sequence, in order
    block_size: int
    # Known on the host, so kernels can size their grids without reading device tensors:
    num_decodes: int    # the first num_decodes sequences have exactly one new token (decode kernels take them)
    max_query_len: int  # most new tokens of any sequence
    max_seq_len: int    # longest context
    # What kernels derive from the fields above (the CPU kernel's row arrays): computed by the first layer
    # of the step that needs it and reused by the others. The fields never change after `build`.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def build(
        cls,
        num_new_tokens: list[int],
        num_cached_tokens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences that add `num_new_tokens[i]` tokens after `num_cached_tokens[i]`."""
        positions, slots = [], []
        for new, cached, blocks in zip(num_new_tokens, num_cached_tokens, block_tables, strict=True):
            if cached + new > len(blocks) * block_size:
                raise ValueError(f"{cached + new} tokens do not fit in {len(blocks)} blocks of {block_size}")
            positions += range(cached, cached + new)
            slots += slot_mapping(blocks, cached, cached + new, block_size)
        width = max(len(b) for b in block_tables)
        padded = [b + [-1] * (width - len(b)) for b in block_tables]
        starts = [0]
        for new in num_new_tokens:
            starts.append(starts[-1] + new)
        as_long = dict(dtype=torch.long, device=device)
        lens = [c + n for c, n in zip(num_cached_tokens, num_new_tokens, strict=True)]
        return cls(
            positions=torch.tensor(positions, **as_long),
            query_start_loc=torch.tensor(starts, **as_long),
            seq_lens=torch.tensor(lens, **as_long),
            slot_mapping=torch.tensor(slots, **as_long),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            block_size=block_size,
            num_decodes=count_decodes(num_new_tokens),
            max_query_len=max(num_new_tokens),
            max_seq_len=max(lens),
        )


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slot of each token position in [start, end) of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def count_decodes(num_new_tokens: list[int]) -> int:
    """How many sequences at the front of the batch have exactly one new token."""
    count = 0
    while count < len(num_new_tokens) and num_new_tokens[count] == 1:
        count += 1
    return count
