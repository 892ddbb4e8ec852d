"""Wrong causal masks and attentions."""

import math

import torch


def mask_upper(num_queries, num_keys):
    """The wrong direction: each query sees the future, not the past."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool).triu(diagonal=num_keys - num_queries)


def mask_top_left(num_queries, num_keys):
    """Aligned to the first key, as if the queries were the first tokens: wrong for a decode step."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool).tril()


def mask_strict(num_queries, num_keys):
    """Hides each token from itself."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool).tril(diagonal=num_keys - num_queries - 1)


def mask_additive(num_queries, num_keys):
    """An additive float mask (0 and -inf) where a boolean one was asked for."""
    allowed = torch.ones(num_queries, num_keys, dtype=torch.bool).tril(diagonal=num_keys - num_queries)
    return torch.zeros(num_queries, num_keys).masked_fill(~allowed, float("-inf"))


def _attention(q, k, v, scale=True, direction="lower", interleave=True, dim=-1, stable=True):
    """Attention with one switch flipped from the right one (the defaults)."""
    group = q.shape[0] // k.shape[0]
    k, v = (k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)) if interleave else (k.repeat(group, 1, 1),
                                                                                              v.repeat(group, 1, 1))
    scores = q.float() @ k.float().transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    tq, tk = q.shape[-2], k.shape[-2]
    ones = torch.ones(tq, tk, dtype=torch.bool)
    allowed = {"lower": ones.tril(tk - tq), "top_left": ones.tril(), "upper": ones.triu(tk - tq)}[direction]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if stable:
        weights = scores.softmax(dim=dim)
    else:
        weights = scores.exp() / scores.exp().sum(dim=dim, keepdim=True)
    return (weights @ v.float()).to(q.dtype)


WRONG = {
    "causal_mask": {
        "wrong direction": mask_upper,
        "aligned to the first key": mask_top_left,
        "hides the diagonal": mask_strict,
        "additive float mask": mask_additive,
    },
    "attention": {
        "no 1/sqrt(d) scale": lambda q, k, v: _attention(q, k, v, scale=False),
        "mask in the wrong direction": lambda q, k, v: _attention(q, k, v, direction="upper"),
        "mask aligned to the first key": lambda q, k, v: _attention(q, k, v, direction="top_left"),
        "KV heads tiled, not interleaved": lambda q, k, v: _attention(q, k, v, interleave=False),
        "softmax over the queries": lambda q, k, v: _attention(q, k, v, dim=-2),
        "softmax without subtracting the max": lambda q, k, v: _attention(q, k, v, stable=False),
    },
}
