"""Wrong verification steps and wrong n-gram lookups."""

import torch


def _verify(drafts, q, p, g, accept=None, on_reject="residual", bonus=True):
    """Rejection sampling with one rule changed from the right one (the defaults)."""
    out = []
    for i, d in enumerate(drafts):
        u = float(torch.rand((), generator=g))
        keep = accept(p[i], q[i], d, u) if accept else u * float(q[i, d]) < float(p[i, d])
        if keep:
            out.append(d)
            continue
        if on_reject == "residual":
            rest = (p[i] - q[i]).clamp(min=0)
        elif on_reject == "target":
            rest = p[i]
        else:   # "draft"
            rest = q[i]
        out.append(int(torch.multinomial(rest / rest.sum(), 1, generator=g)))
        return out
    if bonus:
        out.append(int(torch.multinomial(p[len(drafts)], 1, generator=g)))
    return out


def _ngram(tokens, min_n, max_n, k, earliest=True, longest_first=True, exclude_suffix=True, offset=0):
    """N-gram lookup with one choice changed from the right one (the defaults)."""
    sizes = range(min(max_n, len(tokens) - 1), min_n - 1, -1)
    for n in (sizes if longest_first else reversed(sizes)):
        suffix = tokens[len(tokens) - n:]
        limit = len(tokens) - n if exclude_suffix else len(tokens) - n + 1
        starts = [s for s in range(limit) if tokens[s:s + n] == suffix]
        if starts:
            start = starts[0] if earliest else starts[-1]
            return tokens[start + n + offset:start + n + offset + k]
    return []


WRONG = {
    "spec_verify": {
        "keeps a draft whenever the target finds it likely": lambda d, q, p, g: _verify(
            d, q, p, g, accept=lambda pi, qi, t, u: float(pi[t]) > 0.2),
        "resamples from the target, not the residual": lambda d, q, p, g: _verify(d, q, p, g, on_reject="target"),
        "accepts with probability p(d), ignoring q": lambda d, q, p, g: _verify(
            d, q, p, g, accept=lambda pi, qi, t, u: u < float(pi[t])),
        "no bonus token after k kept drafts": lambda d, q, p, g: _verify(d, q, p, g, bonus=False),
        "resamples from the draft after a rejection": lambda d, q, p, g: _verify(d, q, p, g, on_reject="draft"),
    },
    "ngram_lookup": {
        "latest occurrence instead of the earliest": lambda t, a, b, k: _ngram(t, a, b, k, earliest=False),
        "shortest n-gram first": lambda t, a, b, k: _ngram(t, a, b, k, longest_first=False),
        "matches the suffix with itself": lambda t, a, b, k: _ngram(t, a, b, k, exclude_suffix=False),
        "starts one token late": lambda t, a, b, k: _ngram(t, a, b, k, offset=1),
        "ignores max_n": lambda t, a, b, k: _ngram(t, a, len(t), k),
    },
}
