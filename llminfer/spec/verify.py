"""Verification: keep the longest prefix of a draft that the target model would have produced, plus one
token of its own, so that what comes out is distributed exactly as if the target had sampled alone.

The rule (Leviathan et al. 2023, Chen et al. 2023): draft token d, drawn from the draft's distribution q,
is accepted with probability min(1, p(d) / q(d)), where p is the target's distribution at that position.
At the first rejection the verifier samples from the residual max(0, p - q), renormalised, and stops.
If all k drafts are accepted it samples one more token from the target's distribution after them. Why
this is exact: a token x comes out of one position with probability q(x) min(1, p(x)/q(x)) (drafted and
accepted) + P(reject) * residual(x) (resampled) = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x).

At temperature 0, p puts all its mass on the target's argmax: a draft is kept exactly when it equals the
argmax, and the first mismatch is replaced by the argmax. No randomness is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llminfer.spec.proposer import Draft


def verify_draft(draft: Draft, target_probs: Callable[[int], torch.Tensor], greedy: bool,
                 generator: torch.Generator | None = None) -> list[int]:
    """The tokens that come out of one verification: the accepted drafts, then one more.

    `target_probs(i)` is the target's distribution [vocab] at position i (after the first i drafts;
    i = len(draft) is the position after all of them), or its logits when `greedy`. It is a function
    because a request's penalties depend on the tokens before each position, and because a rejection
    makes the later positions unnecessary."""
    out: list[int] = []
    for i, token in enumerate(draft.token_ids):
        p = target_probs(i)
        if greedy:
            best = int(p.argmax())
            out.append(best)
            if best != token:
                return out
            continue
        q_token = 1.0 if draft.probs is None else float(draft.probs[i, token])
        p_token = float(p[token])
        if p_token >= q_token or float(torch.rand((), generator=generator)) * q_token < p_token:
            out.append(token)
            continue
        q = _one_hot(token, p) if draft.probs is None else draft.probs[i].to(p)
        out.append(_draw(residual(p, q), generator))
        return out
    last = target_probs(len(draft.token_ids))
    out.append(int(last.argmax()) if greedy else _draw(last, generator))
    return out


def greedy_accept(draft_tokens: list[int], argmaxes: list[int]) -> list[int]:
    """`verify_draft` at temperature 0 from the target's argmax at each of the 1 + k positions (computed for a
    whole batch at once): the drafts up to the first mismatch, then the target's own token there."""
    out = []
    for token, best in zip(draft_tokens, argmaxes, strict=False):
        out.append(best)
        if best != token:
            return out
    return out + [argmaxes[len(draft_tokens)]]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q), renormalised: the part of the target's distribution that the draft under-proposes.
    It is only needed after a rejection, which implies q(d) > p(d) for the drafted d, so it is not all zero,
    except by rounding when p and q are equal; then p itself is the right answer."""
    rest = (p - q).clamp(min=0)
    total = rest.sum()
    return rest / total if total > 0 else p


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
