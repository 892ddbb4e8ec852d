"""Answer key for the exercise `prefix_hash` (chapter 9, prefix caching): chained hashes of full blocks.

Uses `hash_block` from `llminfer.kv.block_pool`, which the notebook imports and gives the student as the
hash function: hash_block(parent_hash, token_ids), with parent_hash None for the first block.
"""

from llminfer.kv.block_pool import hash_block  # given by the notebook: the hash of one block


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained hash of each full block of token_ids, in order: one per block_size tokens, none for a
    partial last block."""
    hashes: list[int] = []
    parent = None                                        # the first block has no parent
    num_full = len(token_ids) // block_size              # a partial last block is still filling: no hash
    for start in range(0, num_full * block_size, block_size):
        # The chain makes a block's name depend on every token before it, not only its own.
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes
