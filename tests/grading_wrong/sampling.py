"""Wrong top-p and min-p filters."""

import torch


def top_p_drops_the_crossing_token(logits, p):
    """Off by one: drops the token whose probability carries the sum past p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def top_p_strict(logits, p):
    """`>` where the rule needs `>=`: keeps one token too many when the sum lands exactly on p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs > p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def top_p_unsorted(logits, p):
    """Sums probabilities in vocabulary order instead of from the most likely token down."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs.cumsum(dim=-1) - probs >= p, float("-inf"))


def top_p_sorted_order(logits, p):
    """Right tokens, but returned in sorted order: forgets to scatter back to vocabulary order."""
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    return sorted_logits.masked_fill(probs.cumsum(dim=-1) - probs >= p, float("-inf"))


def top_p_in_place(logits, p):
    """Right answer, but written into the caller's tensor."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p
    return logits.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))


def min_p_on_logits(logits, min_p):
    """Compares logits, not probabilities, with min_p times the largest."""
    return logits.masked_fill(logits < min_p * logits.max(dim=-1, keepdim=True).values, float("-inf"))


def min_p_absolute(logits, min_p):
    """Drops probabilities below min_p itself, not below min_p times the top probability."""
    return logits.masked_fill(logits.softmax(dim=-1) < min_p, float("-inf"))


def min_p_non_strict(logits, min_p):
    """`<=`: also drops tokens exactly at the threshold, such as ties with the top token when min_p = 1."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs <= min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def min_p_global_max(logits, min_p):
    """One threshold for the whole batch, from the largest probability of any row."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def returns_a_list(logits, p):
    """The right numbers as a Python list."""
    return logits.tolist()


WRONG = {
    "top_p": {
        "drops the crossing token": top_p_drops_the_crossing_token,
        "strict comparison": top_p_strict,
        "unsorted cumulative sum": top_p_unsorted,
        "returns sorted order": top_p_sorted_order,
        "modifies its input": top_p_in_place,
        "returns a list": returns_a_list,
    },
    "min_p": {
        "threshold on logits": min_p_on_logits,
        "absolute threshold": min_p_absolute,
        "non-strict comparison": min_p_non_strict,
        "one threshold per batch": min_p_global_max,
    },
}
