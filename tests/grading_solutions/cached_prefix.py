"""Answer key for the exercise `cached_prefix` (chapter 9, prefix caching): the longest cached prefix.

Uses `hash_block` from `llminfer.kv.block_pool`, which the notebook imports and gives the student as the
hash function: hash_block(parent_hash, token_ids), with parent_hash None for the first block.
"""

from llminfer.kv.block_pool import hash_block  # given by the notebook: the hash of one block


def cached_prefix(token_ids: list[int], block_size: int, cache: dict[int, int]) -> list[int]:
    """Block ids of the longest cached prefix of token_ids (cache: block hash -> block id), in order,
    up to the first miss, never including the block that holds the prompt's last token."""
    # The last token is always computed (its logits give the first output token), so only full blocks
    # within the first len(token_ids) - 1 tokens may be reused.
    hits: list[int] = []
    for block_hash in _block_hashes(token_ids[:-1], block_size):
        if block_hash not in cache:
            break           # stop at the first miss: a later block's keys depend on this one's
        hits.append(cache[block_hash])
    return hits


def _block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained hash of each full block of token_ids (the answer to `prefix_hash`)."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes
