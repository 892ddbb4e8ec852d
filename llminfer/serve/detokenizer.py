"""Incremental detokenisation: turn a growing list of token ids into text deltas a client can show at once.

Two things make this harder than `decode(new_tokens)`:

- A byte-level BPE token is a run of bytes, not of characters: an emoji or a CJK character can be split
  across tokens, and decoding the first half alone gives U+FFFD. So the text of the newest tokens is
  held back while it ends in U+FFFD, and sent when the character completes.
- A stop string can straddle tokens ("\\n\\n" as "\\n" then "\\n"). The engine cuts the final text before
  the stop string, so text that might be the start of one is held back: the last `len(longest stop) - 1`
  characters, and everything while `min_tokens` keeps stop strings from counting (the engine then
  searches the whole text once they do).

Decoding the whole output at every step costs O(n) per token; like vLLM, each step decodes only a short
window of tokens (from `prefix_offset`) and keeps the part after what that window already produced.
What was sent is always a prefix of the engine's final text, so `finish` completes it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"   # what a decoder yields for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Feed it the completion's token ids as they grow (`update`); it returns the text that is safe to send."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.decode = _fast_decode(tokenizer)
        self.holdback = max((len(s) for s in stop), default=1) - 1   # a stop string's longest proper prefix
        self.min_tokens = min_tokens if stop else 0
        self.token_ids: list[int] = []
        self.text = ""          # all text decoded so far (complete characters only)
        self.sent = 0           # characters of `text` already returned
        self.prefix_offset = 0  # the decode window starts here...
        self.read_offset = 0    # ...and the text of tokens before here is already in `text`

    def update(self, token_ids: Sequence[int]) -> str:
        """Take the completion's token ids so far (a longer list each call); return the new safe text."""
        for token in token_ids[len(self.token_ids):]:
            self.token_ids.append(token)
            self._decode_newest()
        if len(self.token_ids) < self.min_tokens:
            return ""
        safe = max(len(self.text) - self.holdback, self.sent)
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def _decode_newest(self) -> None:
        ids = self.token_ids
        before = self.decode(ids[self.prefix_offset:self.read_offset])
        after = self.decode(ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text. The engine's text may cut a held-back stop string or
        drop a stop token's text; an aborted or failed request's text may be shorter than what was sent,
        and then nothing more is sent."""
        sent = self.text[:self.sent]
        delta = final_text[len(sent):] if final_text.startswith(sent) else ""
        self.sent += len(delta)
        return delta


def _fast_decode(tokenizer):
    """The Rust tokenizer's own decode when it gives the same text as the Hugging Face wrapper's (no clean-up of
    spaces), which costs a quarter of the time per call; the wrapper's otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode
    return lambda ids: backend.decode(ids, skip_special_tokens=False)
