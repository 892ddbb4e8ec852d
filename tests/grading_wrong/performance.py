"""Wrong byte counts of a decode step."""

from llminfer.bench.roofline import kv_bytes_per_token, parameter_count


def _bytes(config, context_len, dtype_bytes, batch_size, kv=True, weights_per_sequence=False, whole_table=False,
           own_token=True, kv_heads=None):
    """A decode step's bytes with one switch flipped from the right count (the defaults)."""
    weights = parameter_count(config)
    if not config.tie_word_embeddings and not whole_table:
        weights -= (config.vocab_size - batch_size) * config.hidden_size   # only the new tokens' rows
    weights *= batch_size if weights_per_sequence else 1
    per_token = 2 * config.num_layers * (kv_heads or config.num_kv_heads) * config.head_dim * dtype_bytes
    tokens = context_len + (1 if own_token else 0)
    return weights * dtype_bytes + (batch_size * tokens * per_token if kv else 0)


def as_float(config, context_len, dtype_bytes, batch_size=1):
    """The right count, as a float."""
    return float(_bytes(config, context_len, dtype_bytes, batch_size))


WRONG = {
    "decode_bytes": {
        "forgets the KV cache": lambda c, n, b, s=1: _bytes(c, n, b, s, kv=False),
        "weights read once per sequence": lambda c, n, b, s=1: _bytes(c, n, b, s, weights_per_sequence=True),
        "reads the whole untied embedding table": lambda c, n, b, s=1: _bytes(c, n, b, s, whole_table=True),
        "forgets the new token's own K and V": lambda c, n, b, s=1: _bytes(c, n, b, s, own_token=False),
        "counts query heads in the cache": lambda c, n, b, s=1: _bytes(c, n, b, s, kv_heads=c.num_heads),
        "K only (no factor 2)": lambda c, n, b, s=1: _bytes(c, n, b, s) - s * (n + 1) * kv_bytes_per_token(c, b) // 2,
        "returns a float": as_float,
    },
}
