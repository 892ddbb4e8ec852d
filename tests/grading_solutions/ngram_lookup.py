"""Answer key for the exercise `ngram_lookup` (chapter 17, speculative decoding): n-gram prompt lookup.

The longest suffix n-gram (min_n <= n <= max_n) that also occurred earlier wins; of its earlier occurrences the
earliest one; the draft is the (up to) k tokens that followed it there.
"""


def ngram_draft(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k draft tokens copied from after the earliest earlier occurrence of the longest suffix n-gram."""
    total = len(token_ids)
    # n can be at most total - 1: an earlier occurrence needs at least one token before the suffix starts.
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = token_ids[total - n:]
        # An occurrence starting at s must end before the suffix's last token (s + n <= total - 1), or it would
        # be the suffix itself; so s runs over 0 .. total - n - 1, earliest first.
        for start in range(total - n):
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + k]
    return []
