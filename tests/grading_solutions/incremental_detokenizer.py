"""Answer key for the exercise `incremental_detokenizer` (chapter 11, serving): an incremental detokenizer.

The tokenizer is the one the test passes in (the notebook's byte-level BPE tokenizer); only its `decode` is used.
At every call the whole output is decoded again, which is simple and exact; the chapter's window
(`prefix_offset`, `read_offset`) makes the cost per token constant instead of growing with the output.
"""

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"   # what decoding gives for bytes that do not (yet) make a whole character


class IncrementalDetokenizer:
    """Text deltas for a completion whose token ids arrive a few at a time."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), min_tokens: int = 0):
        self.tokenizer = tokenizer
        # The last len(longest stop) - 1 characters could be the start of a stop string that the next tokens
        # complete, and the engine would then cut the final text before it: hold them back.
        self.holdback = max((len(s) for s in stop), default=1) - 1
        # With stop strings the engine only looks for them once there are min_tokens tokens, and then in the whole
        # output: before that, any text may still be cut. Without stop strings min_tokens changes nothing here.
        self.min_tokens = min_tokens if stop else 0
        self.sent = ""    # everything returned so far

    def update(self, token_ids: Sequence[int]) -> str:
        """The completion's token ids so far (at least as many as the last call): the new text safe to send."""
        if len(token_ids) < self.min_tokens:
            return ""
        text = self.tokenizer.decode(list(token_ids))
        # A trailing U+FFFD is (or may be) a character whose last bytes are still to come: hold it back. Text
        # that ends in a whole character never changes when more bytes follow (UTF-8 is self-synchronising).
        text = text.rstrip(_REPLACEMENT)
        safe = max(len(text) - self.holdback, 0)   # not text[:-holdback]: that is wrong for holdback 0
        if safe <= len(self.sent):
            return ""
        delta = text[len(self.sent):safe]
        self.sent += delta
        return delta

    def finish(self, final_text: str) -> str:
        """The engine's final text: the part of it not sent yet (a U+FFFD at its end included)."""
        if not final_text.startswith(self.sent):   # cannot happen when update held back enough
            return ""
        return final_text[len(self.sent):]
