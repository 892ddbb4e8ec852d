"""Chapter 9, prefix caching: the chained hashes of a prompt's full blocks, and the longest cached prefix."""

from __future__ import annotations

import random
from collections.abc import Sequence
from numbers import Integral

from llminfer.grading.compare import Mismatch
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.kv import BlockPool

MIRRORS = ("llminfer.kv.block_pool:BlockPool",)   # hash_block is the building block handed out; the pool is not

CHAPTER = "chapters/engine/09_prefix_caching"


def reference_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hash of each full block, chained: hash_block(previous block's hash, this block's tokens). Computed
    the way the engine does it, by `BlockPool.cache_full_blocks` on a table holding the prompt."""
    num_full = len(token_ids) // block_size
    pool = BlockPool(max(num_full, 1), block_size)
    table: list[int] = []
    pool.allocate(table, num_full * block_size)
    hashes: list[int] = []
    pool.cache_full_blocks(table, list(token_ids), len(token_ids), hashes)
    return hashes


def reference_cached_prefix(token_ids: Sequence[int], block_size: int, cache: dict[int, int]) -> list[int]:
    """The ids of the cached blocks holding the longest prefix of `token_ids` (`cache`: block hash -> block id),
    up to the first miss. The prompt's last token is always computed (its logits give the first output token),
    so only full blocks within the first len(token_ids) - 1 tokens count, as in `Scheduler.schedule`."""
    hits = []
    for block_hash in reference_block_hashes(token_ids[:len(token_ids) - 1], block_size):
        if block_hash not in cache:
            break
        hits.append(cache[block_hash])
    return hits


def _expect_ints(actual: object, expected: list[int], what: str, noun: str) -> str:
    """Pass if `actual` is a list equal to `expected`; say how it differs otherwise (`noun`: "hash", "block id")."""
    nouns = noun + ("es" if noun.endswith("h") else "s")
    if not isinstance(actual, list):
        raise Mismatch(f"{what} is a {type(actual).__name__}, expected a list of {len(expected)} {nouns}")
    wrong = [value for value in actual if not isinstance(value, Integral)]
    if wrong:
        raise Mismatch(f"{what} holds a {type(wrong[0]).__name__}, expected {nouns} (ints)")
    if len(actual) != len(expected):
        raise Mismatch(f"{what}: {len(actual)} {nouns}, expected {len(expected)}")
    for index, (got, want) in enumerate(zip(actual, expected)):
        if got != want:
            raise Mismatch(f"{what}: {noun} {index} is {got}, expected {want}")
    return f"{len(expected)} {nouns}, all equal"


def _prompt(length: int, seed: int, vocab: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


def _hash_test(token_ids: list[int], block_size: int):
    def run(block_hashes) -> str:
        expected = reference_block_hashes(token_ids, block_size)
        return _expect_ints(block_hashes(list(token_ids), block_size), expected, "the hashes", "hash")

    return run


def _shared_prefix(block_hashes) -> str:
    system = _prompt(8, seed=93)
    a, b = system + _prompt(7, seed=94), system + _prompt(9, seed=95)
    ha, hb = block_hashes(a, 4), block_hashes(b, 4)
    _expect_ints(ha, reference_block_hashes(a, 4), "the hashes of the first prompt", "hash")
    _expect_ints(hb, reference_block_hashes(b, 4), "the hashes of the second prompt", "hash")
    return "2 shared blocks, 2 equal hashes; the third differs"


BLOCK_HASH_TESTS = (
    ExerciseTest("12 tokens in blocks of 4: three chained hashes", 2, _hash_test(_prompt(12, seed=90), 4)),
    ExerciseTest("a partial last block has no hash (10 tokens, blocks of 4)", 1, _hash_test(_prompt(10, seed=91), 4)),
    ExerciseTest("fewer tokens than one block: no hashes", 1, _hash_test(_prompt(3, seed=92), 4)),
    ExerciseTest("equal blocks at different places get different hashes", 2, _hash_test([5, 6, 7] * 4, 3)),
    ExerciseTest("two prompts with a common system prompt share its hashes", 1, _shared_prefix),
    ExerciseTest("block size 1", 1, _hash_test(_prompt(6, seed=96), 1)),
    ExerciseTest("1000 tokens in blocks of 16", 1, _hash_test(_prompt(1000, seed=97), 16), visible=False),
)


def _cache_of(*prompts: tuple[list[int], int], skip: tuple[int, ...] = ()) -> dict[int, int]:
    """A prefix cache holding the full blocks of these prompts (hash -> a block id), but for the ones in `skip`
    (evicted), counted over all blocks in order."""
    cache, next_id = {}, 100
    for token_ids, block_size in prompts:
        for block_hash in reference_block_hashes(token_ids, block_size):
            if next_id - 100 not in skip and block_hash not in cache:
                cache[block_hash] = next_id
            next_id += 1
    return cache


def _prefix_test(token_ids: list[int], block_size: int, cache: dict[int, int]):
    def run(cached_prefix) -> str:
        expected = reference_cached_prefix(token_ids, block_size, cache)
        return _expect_ints(cached_prefix(list(token_ids), block_size, dict(cache)), expected, "the block ids",
                            "block id")

    return run


_SYSTEM = _prompt(12, seed=80)
_EARLIER = _SYSTEM + _prompt(9, seed=81)        # served before: 5 full blocks of 4 are in the cache
_FULL = _prompt(12, seed=82)                    # exactly 3 full blocks

CACHED_PREFIX_TESTS = (
    ExerciseTest("a new prompt after the same 12-token system prompt: 3 hits", 2,
                 _prefix_test(_SYSTEM + _prompt(6, seed=83), 4, _cache_of((_EARLIER, 4)))),
    ExerciseTest("stop at the first miss, even if a later block is cached", 2,
                 _prefix_test(_EARLIER + [1], 4, _cache_of((_EARLIER, 4), skip=(2,)))),
    ExerciseTest("a fully cached prompt of 3 blocks still computes its last token: 2 hits", 2,
                 _prefix_test(_FULL, 4, _cache_of((_FULL, 4)))),
    ExerciseTest("one token more than 3 cached blocks: 3 hits", 1, _prefix_test(_FULL + [7], 4, _cache_of((_FULL, 4)))),
    ExerciseTest("nothing cached: no hits", 1, _prefix_test(_prompt(9, seed=84), 4, {})),
    ExerciseTest("a cache full of other prompts' blocks, blocks of 3", 1,
                 _prefix_test(_SYSTEM + _prompt(4, seed=85), 3,
                              _cache_of((_prompt(20, seed=86), 3), (_SYSTEM[:9] + _prompt(6, seed=87), 3))),
                 visible=False),
)

EXERCISES = [
    Exercise("prefix_hash", "chained hashes of a prompt's full blocks", CHAPTER, "block_hashes",
             reference_block_hashes, BLOCK_HASH_TESTS, mirrors=MIRRORS),
    Exercise("cached_prefix", "the longest cached prefix of a prompt", CHAPTER, "cached_prefix",
             reference_cached_prefix, CACHED_PREFIX_TESTS, mirrors=MIRRORS),
]
