"""Wrong counts of the sequences that fit next to the weights."""

from llminfer.bench.roofline import kv_bytes_per_token, parameter_count


def _fit(config, memory_bytes, dtype_bytes, context_len, block_size=16, weights=True, k_only=False,
         query_heads=False, whole_blocks=True, clamp=True):
    """The count with one switch flipped from the right one (the defaults)."""
    free = memory_bytes - (parameter_count(config) * dtype_bytes if weights else 0)
    per_token = kv_bytes_per_token(config, dtype_bytes) // (2 if k_only else 1)
    if query_heads:
        per_token = per_token * config.num_heads // config.num_kv_heads
    tokens = -(-context_len // block_size) * block_size if whole_blocks else context_len
    count = free // (tokens * per_token)
    return max(count, 0) if clamp else count


WRONG = {
    "sequences_that_fit": {
        "forgets the weights": lambda c, m, b, n, s=16: _fit(c, m, b, n, s, weights=False),
        "K only (half the cache)": lambda c, m, b, n, s=16: _fit(c, m, b, n, s, k_only=True),
        "counts query heads in the cache": lambda c, m, b, n, s=16: _fit(c, m, b, n, s, query_heads=True),
        "ignores whole blocks (tokens, not blocks)": lambda c, m, b, n, s=16: _fit(c, m, b, n, s, whole_blocks=False),
        "negative when the weights do not fit": lambda c, m, b, n, s=16: _fit(c, m, b, n, s, clamp=False),
        "returns a float": lambda c, m, b, n, s=16: float(_fit(c, m, b, n, s)),
    },
}
