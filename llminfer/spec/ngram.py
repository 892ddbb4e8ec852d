"""N-gram prompt lookup (vLLM's `ngram` method): draft by copying what followed the last few tokens the
previous time they appeared.

Summaries, code edits and answers grounded in a document repeat long stretches of their prompt. When the
last n tokens of a request occurred earlier in its prompt or output, the tokens that followed them then
are a free guess at what follows now: no model runs, and the verifier throws away whatever is wrong.
"""

from __future__ import annotations

from array import array

from llminfer.engine.sequence import Sequence
from llminfer.spec.proposer import Draft, Proposer


def find_ngram_continuation(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the longest suffix of `token_ids`
    whose length is in [min_n, max_n]; [] when no such suffix occurred before (vLLM's rule).

    The search runs over the ids packed as 4-byte integers with bytes.find, so it is C-speed; a match at an
    offset that is not a multiple of 4 straddles two ids and is skipped."""
    tokens = array("i", token_ids).tobytes()
    total = len(token_ids)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[4 * (total - n):]
        start = tokens.find(suffix, 0, 4 * (total - 1))   # the match must end before the last token
        while start != -1 and start % 4:
            start = tokens.find(suffix, start + 1, 4 * (total - 1))
        if start != -1:
            follow = start // 4 + n
            return token_ids[follow:follow + k]
    return []


class NgramProposer(Proposer):
    def __init__(self, num_speculative_tokens: int, max_model_len: int, min_n: int, max_n: int):
        super().__init__(num_speculative_tokens, max_model_len)
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence]) -> dict[Sequence, Draft]:
        drafts = {}
        for seq in seqs:
            room = self.room(seq)
            tokens = find_ngram_continuation(seq.token_ids, self.min_n, self.max_n, room) if room else []
            if tokens:
                drafts[seq] = Draft(tokens)
        return drafts
