"""The block pool: who owns which KV cache block, and which blocks hold a known prefix.

Every block has a reference count (how many running requests use it). Blocks nobody uses
wait in a free queue, least recently freed first. With prefix caching, a *full* block is
named by a chained hash of its tokens: `hash(parent block's hash, this block's token ids)`,
so equal hashes mean equal prefixes, not just equal blocks. A freed block keeps its hash
and contents until the allocator actually needs it (lazy LRU eviction), so a later request
with the same prefix can take it back without recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = 0   # the parent of a prompt's first block


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The chained hash of a full block: it depends on every token before it, through the parent (None for the
    first block). Python hashes tuples of ints the same way in every process and run, so the hashes do too."""
    return hash((ROOT_HASH if parent_hash is None else parent_hash, tuple(token_ids)))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None   # set once the block is full and registered in the prefix cache
    parent_hash: int | None = None  # stored with the tokens so a hit can be verified exactly
    token_ids: tuple[int, ...] = ()


class BlockPool:
    """Hands out KV cache blocks to requests' block tables and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}  # block hash -> the block holding those tokens
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request uses (some may still hold a cached prefix until they are reused)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def _take_free_block(self) -> Block:
        _, block = self.free_queue.popitem(last=False)  # the least recently freed
        if block.block_hash is not None:                # evict its cached prefix now, not earlier
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash, block.parent_hash, block.token_ids = None, None, ()
            self.num_evictions += 1
        block.ref_count = 1
        return block

    def allocate(self, block_table: list[int], num_tokens: int, prefix: Sequence[Block] = ()) -> bool:
        """Make `block_table` (empty, or the request's current one) hold `num_tokens` tokens, starting with
        the cached `prefix` blocks if given. All or nothing: returns False, changing nothing, if too few free."""
        need = blocks_needed(num_tokens, self.block_size) - len(block_table) - len(prefix)
        # A cached block that is free still counts as free until we take it back here.
        available = self.num_free_blocks - sum(1 for b in prefix if b.ref_count == 0)
        if need > available:
            return False
        for block in prefix:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1
            block_table.append(block.block_id)
        for _ in range(max(need, 0)):
            block_table.append(self._take_free_block().block_id)
        return True

    def free(self, block_table: list[int]) -> None:
        """Give back a request's blocks. The tail goes to the free queue first, so it is evicted first:
        a prompt's first blocks are the ones most likely to be shared again."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = block
        block_table.clear()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as if no block had ever been filled (benchmarks call it between
        repeats of the same requests). Refused, returning False, while any block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.cached.values():
            block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        self.cached.clear()
        return True

    def find_cached_prefix(self, token_ids: Sequence[int], max_tokens: int) -> tuple[list[Block], list[int]]:
        """The longest run of cached full blocks that starts `token_ids` and covers at most `max_tokens`
        tokens, with their hashes. Nothing is taken yet: pass the blocks to `allocate`."""
        if not self.enable_prefix_caching:
            return [], []
        hits, hashes, parent = [], [], None
        size = self.block_size
        for start in range(0, max_tokens - size + 1, size):
            chunk = tuple(token_ids[start:start + size])
            block_hash = hash_block(parent, chunk)
            block = self.cached.get(block_hash)
            # Compare what is stored: a hash collision must never hand out someone else's keys and values.
            if block is None or block.parent_hash != parent or block.token_ids != chunk:
                break
            hits.append(block)
            hashes.append(block_hash)
            parent = block_hash
        return hits, hashes

    def cache_full_blocks(self, block_table: list[int], token_ids: Sequence[int], num_computed_tokens: int,
                          block_hashes: list[int]) -> None:
        """Register the request's blocks that became full (and computed) since the last call.
        `block_hashes` holds the hashes of its blocks registered so far and is extended in place."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for index in range(len(block_hashes), num_computed_tokens // size):
            chunk = tuple(token_ids[index * size:(index + 1) * size])
            parent = block_hashes[-1] if block_hashes else None
            block_hash = hash_block(parent, chunk)
            block_hashes.append(block_hash)
            block = self.blocks[block_table[index]]
            if block_hash not in self.cached and block.block_hash is None:
                block.block_hash, block.parent_hash, block.token_ids = block_hash, parent, chunk
                self.cached[block_hash] = block
