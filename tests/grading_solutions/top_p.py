"""Answer key for the exercise `top_p` (chapter 1, from prompt to text): top-p (nucleus) filtering."""

from __future__ import annotations

import torch


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits [..., vocab] with every token outside the top-p nucleus set to -inf (a new tensor).

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least p;
    p = 1 keeps every token."""
    if p >= 1.0:
        # Rounding can make the cumulative sum reach 1 before the last token, which would drop tokens
        # that p = 1 must keep: handle it on its own.
        return logits.clone()

    # Rank the tokens of each row from most to least likely; `order` maps rank -> token id.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)

    # The probability mass of the tokens ranked strictly above each token. Once that mass has reached p
    # the nucleus is complete, so the token is dropped. The top token has nothing above it (0 < p): it
    # always stays. `>=`, not `>`: with four equal logits and p = 0.5, two tokens already reach p.
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p

    # Put the flags back in vocabulary order: the flag at rank r belongs to token order[r].
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)

    # masked_fill (not masked_fill_) returns a new tensor and leaves the caller's logits alone.
    return logits.masked_fill(drop, float("-inf"))
