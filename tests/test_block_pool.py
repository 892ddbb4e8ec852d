"""The block pool: reference counts, all-or-nothing allocation, chained prefix hashes, lazy LRU eviction."""

import pytest

import llminfer.kv.block_pool as block_pool
from llminfer.kv.block_pool import BlockPool, blocks_needed, hash_block


def register(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens`, mark them computed and cached, and return the block table."""
    table, hashes = [], []
    assert pool.allocate(table, len(tokens))
    pool.cache_full_blocks(table, tokens, len(tokens), hashes)
    return table


def test_allocate_and_free_count_references():
    pool = BlockPool(num_blocks=6, block_size=4)
    table = []
    assert pool.allocate(table, 9)                 # 9 tokens need 3 blocks of 4
    assert len(table) == 3 == blocks_needed(9, 4) and pool.num_free_blocks == 3
    assert pool.allocate(table, 12) and len(table) == 3  # still fits
    assert pool.allocate(table, 13) and len(table) == 4
    assert all(pool.blocks[b].ref_count == 1 for b in table)
    pool.free(table)
    assert table == [] and pool.num_free_blocks == 6
    assert all(b.ref_count == 0 for b in pool.blocks)


def test_allocation_is_all_or_nothing():
    pool = BlockPool(num_blocks=4, block_size=2)
    first, second = [], []
    assert pool.allocate(first, 5)   # 3 blocks
    assert not pool.allocate(second, 4)  # needs 2, 1 free
    assert second == [] and pool.num_free_blocks == 1


def test_double_free_is_an_error():
    pool = BlockPool(num_blocks=2, block_size=2)
    table = []
    pool.allocate(table, 2)
    copy = list(table)
    pool.free(table)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(copy)


def test_a_cached_prefix_is_found_and_shared():
    pool = BlockPool(num_blocks=8, block_size=4)
    tokens = list(range(10))                      # blocks [0..3], [4..7] full; [8, 9] partial
    table = register(pool, tokens)
    hits, hashes = pool.find_cached_prefix(tokens, len(tokens))
    assert [b.block_id for b in hits] == table[:2]   # the partial block is never cached
    assert hashes == [hash_block(None, tokens[:4]), hash_block(hashes[0], tokens[4:8])]
    other = []
    assert pool.allocate(other, 10, prefix=hits)
    assert other[:2] == table[:2] and other[2] != table[2]
    assert [pool.blocks[b].ref_count for b in table] == [2, 2, 1]


def test_hashes_are_chained_so_an_equal_block_after_a_different_prefix_misses():
    pool = BlockPool(num_blocks=8, block_size=2)
    register(pool, [1, 2, 3, 4])
    hits, _ = pool.find_cached_prefix([9, 9, 3, 4], 4)
    assert hits == []
    hits, _ = pool.find_cached_prefix([1, 2, 9, 9], 4)
    assert len(hits) == 1


def test_max_tokens_limits_the_hit():
    pool = BlockPool(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4]
    register(pool, tokens)
    assert len(pool.find_cached_prefix(tokens, 3)[0]) == 1   # the last token must be computed anew


def test_a_hash_collision_never_returns_wrong_tokens(monkeypatch):
    monkeypatch.setattr(block_pool, "hash_block", lambda parent, tokens: 42)  # every block collides
    pool = BlockPool(num_blocks=8, block_size=2)
    register(pool, [1, 2, 3, 4])
    assert pool.find_cached_prefix([5, 6, 7, 8], 4)[0] == []
    assert [b.token_ids for b in pool.find_cached_prefix([1, 2, 7, 8], 4)[0]] == [(1, 2)]


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    pool = BlockPool(num_blocks=4, block_size=2)
    old = register(pool, [1, 2, 3, 4])
    new = register(pool, [5, 6, 7, 8])
    old_blocks = list(old)
    pool.free(old)
    pool.free(new)
    assert pool.num_free_blocks == 4 and len(pool.cached) == 4   # freed, still cached
    assert len(pool.find_cached_prefix([1, 2, 3, 4], 4)[0]) == 2
    table = []
    pool.allocate(table, 2)                                       # evicts one block of `old`: its tail
    assert table == [old_blocks[1]] and pool.num_evictions == 1
    assert len(pool.find_cached_prefix([1, 2, 3, 4], 4)[0]) == 1
    assert len(pool.find_cached_prefix([5, 6, 7, 8], 4)[0]) == 2


def test_taking_back_a_free_cached_block_counts_against_free_blocks():
    pool = BlockPool(num_blocks=3, block_size=2)
    table = register(pool, [1, 2, 3, 4])
    pool.free(table)
    hits, _ = pool.find_cached_prefix([1, 2, 3, 4, 5], 5)
    assert len(hits) == 2
    assert not pool.allocate([], 8, prefix=hits)  # 2 hits + 2 new blocks > 3
    grown = []
    assert pool.allocate(grown, 6, prefix=hits) and pool.num_free_blocks == 0


def test_prefix_caching_off_never_hits():
    pool = BlockPool(num_blocks=4, block_size=2, enable_prefix_caching=False)
    register(pool, [1, 2, 3, 4])
    assert pool.find_cached_prefix([1, 2, 3, 4], 4) == ([], [])
    assert pool.cached == {}


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="0 x 16"):
        BlockPool(num_blocks=0, block_size=16)
