"""Answer key for the exercise `min_p` (chapter 1, from prompt to text): min-p filtering."""

from __future__ import annotations

import torch


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Logits [..., vocab] with every token less likely than min_p x (the top token's probability)
    set to -inf, row by row (a new tensor). min_p = 0 keeps every token."""
    if min_p <= 0:
        return logits.clone()

    probs = logits.softmax(dim=-1)
    # Each row gets its own cut-off, from its own most likely token (keepdim so it broadcasts over the row).
    threshold = min_p * probs.amax(dim=-1, keepdim=True)

    # Strictly below the threshold is dropped: at min_p = 1 the tokens tied for the top sit exactly on it
    # (equal logits give bit-identical probabilities) and are all kept.
    return logits.masked_fill(probs < threshold, float("-inf"))
