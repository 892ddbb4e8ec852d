"""Wrong block hashes and wrong cached-prefix lookups."""

from llminfer.kv.block_pool import hash_block


def _hashes(token_ids, block_size, parent_of=lambda hashes, index: hashes[-1] if hashes else None, partial=False):
    """Block hashes with the parent rule or the partial-block rule changed from the right ones (the defaults)."""
    hashes = []
    end = len(token_ids) if partial else len(token_ids) // block_size * block_size
    for index, start in enumerate(range(0, end, block_size)):
        hashes.append(hash_block(parent_of(hashes, index), token_ids[start:start + block_size]))
    return hashes


def _lookup(token_ids, block_size, cache, whole_prompt=False, skip_misses=False, chained=True, ids=True):
    """The cached-prefix lookup with one switch flipped from the right one (the defaults)."""
    tokens = token_ids if whole_prompt else token_ids[:len(token_ids) - 1]
    hashes = _hashes(tokens, block_size) if chained else _hashes(tokens, block_size, lambda hashes, index: None)
    hits = []
    for block_hash in hashes:
        if block_hash not in cache:
            if skip_misses:
                continue
            break
        hits.append(cache[block_hash] if ids else block_hash)
    return hits


WRONG = {
    "prefix_hash": {
        "no chain: each block hashed alone": lambda t, b: _hashes(t, b, lambda hashes, index: None),
        "hashes the partial last block": lambda t, b: _hashes(t, b, partial=True),
        "parent is the first block's hash": lambda t, b: _hashes(t, b, lambda hashes, index: hashes[0] if hashes
                                                                 else None),
        "parent is the block's index": lambda t, b: _hashes(t, b, lambda hashes, index: index or None),
        "returns a tuple": lambda t, b: tuple(_hashes(t, b)),
    },
    "cached_prefix": {
        "takes the prompt's last token from the cache too": lambda t, b, c: _lookup(t, b, c, whole_prompt=True),
        "skips a miss and keeps later hits": lambda t, b, c: _lookup(t, b, c, skip_misses=True),
        "looks blocks up without their chain": lambda t, b, c: _lookup(t, b, c, chained=False),
        "returns hashes, not block ids": lambda t, b, c: _lookup(t, b, c, ids=False),
    },
}
